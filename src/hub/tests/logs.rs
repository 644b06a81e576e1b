//! The hub's warnings under a flood (issue 12 item 3).

use std::collections::BTreeMap;

use super::*;

/// issue 12 item 3: 5,000 garbage payloads make a bounded number of log lines (a burst per
/// reason and window, then one summary), and the rejection counter counts all 5,000.
#[test]
fn garbage_floods_are_rate_limited_in_the_log_but_counted_in_full() {
    let f = Fixture::new();
    let hub = f.hub();
    let (reasons, logs) = capture_warnings(|| {
        let mut reasons = BTreeMap::new();
        for i in 0..5_000u32 {
            let garbage = i.to_le_bytes().repeat(8);
            *reasons
                .entry(rejected(hub.ingest(&gw(), &garbage)))
                .or_insert(0u64) += 1;
        }
        hub.log_limiter().flush();
        reasons
    });
    let total: u64 = hub.stats().rejected.values().sum();
    assert_eq!(total, 5_000);
    assert_eq!(reasons.values().sum::<u64>(), 5_000);
    let lines = logs.lines().count();
    let bound = reasons.len() * (hub.log_limiter().burst() as usize + 1);
    assert!(lines <= bound, "{lines} log lines for {reasons:?}:\n{logs}");
    assert!(logs.contains("suppressed="), "{logs}");
}
