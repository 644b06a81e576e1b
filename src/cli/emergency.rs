//! `citygate emergency start|stop|status --config FILE`: orders an emergency collection for
//! the gateway that `FILE` configures (see `crate::emergency`). The running gateway picks the
//! order up within a second; a stopped one at its next start.

use std::path::Path;
use std::time::Duration;

use super::CliError;
use crate::config::GatewayConfig;
use crate::emergency::{self, Order, Progress};
use crate::reading::now_ms;

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::Runtime(format!("{}: {e}", path.display()))
}

/// `start --policy NAME --reason TEXT --for DURATION`.
pub fn emergency_start(
    config: &Path,
    policy: &str,
    reason: &str,
    duration: &str,
) -> Result<(), CliError> {
    let cfg = GatewayConfig::load(config)?;
    let policies = &cfg.policies;
    let Some(flow) = policies.emergency_policy(policy) else {
        let names: Vec<&str> = policies.emergency.iter().map(|(n, _)| n.as_str()).collect();
        return Err(CliError::Usage(format!(
            "--policy {policy:?} is not an emergency policy of {}; valid: {} (declare them in [policies] emergency)",
            config.display(),
            if names.is_empty() { "none declared".to_string() } else { names.join(", ") }
        )));
    };
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(CliError::Usage(
            "--reason must say why (it travels to the hub with the reports)".into(),
        ));
    }
    let for_ = humantime::parse_duration(duration)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--for {duration:?}: not a duration; valid: a positive duration such as 6h or 90m"
            ))
        })?;
    if for_ > policies.emergency_max {
        return Err(CliError::Usage(format!(
            "--for {duration}: longer than [policies] emergency_max ({}); valid: up to that",
            humantime::format_duration(policies.emergency_max)
        )));
    }
    let path = emergency::order_path(&cfg.store.path);
    let now = now_ms();
    if let Some(o) = emergency::read::<Order>(&path).map_err(CliError::Runtime)? {
        if o.is_active(now) {
            return Err(CliError::Usage(format!(
                "emergency {} ({}) is active until {}; stop it first (citygate emergency stop --config {})",
                o.id,
                o.policy,
                rfc3339(o.ends_ms()),
                config.display()
            )));
        }
    }
    let order = Order {
        id: emergency::new_id(now),
        policy: flow.policy.name().to_string(),
        reason: reason.to_string(),
        started_ms: now,
        expires_ms: now.saturating_add(i64::try_from(for_.as_millis()).unwrap_or(i64::MAX)),
        stopped_ms: None,
    };
    emergency::write(&path, &order).map_err(|e| io_error(&path, e))?;
    println!(
        "emergency {} started: policy {} until {} ({}); records are tagged emergency_id={}. \
         The running gateway switches it on within a second.",
        order.id,
        order.policy,
        rfc3339(order.expires_ms),
        humantime::format_duration(Duration::from_millis(
            u64::try_from(order.expires_ms - now).unwrap_or(0)
        )),
        order.id
    );
    Ok(())
}

/// `stop`: ends the active emergency now.
pub fn emergency_stop(config: &Path) -> Result<(), CliError> {
    let cfg = GatewayConfig::load(config)?;
    let path = emergency::order_path(&cfg.store.path);
    let now = now_ms();
    let mut order = emergency::read::<Order>(&path)
        .map_err(CliError::Runtime)?
        .filter(|o| o.is_active(now))
        .ok_or_else(|| CliError::Usage("no emergency collection is active".into()))?;
    order.stopped_ms = Some(now);
    emergency::write(&path, &order).map_err(|e| io_error(&path, e))?;
    println!(
        "emergency {} stopped; the running gateway ends it within a second, purges what is \
         left of it on the box and reports to the hub",
        order.id
    );
    Ok(())
}

/// `status`: the order and what the gateway did about it.
pub fn emergency_status(config: &Path) -> Result<(), CliError> {
    let cfg = GatewayConfig::load(config)?;
    let order = emergency::read::<Order>(&emergency::order_path(&cfg.store.path))
        .map_err(CliError::Runtime)?;
    let progress = emergency::read::<Progress>(&emergency::progress_path(&cfg.store.path))
        .map_err(CliError::Runtime)?;
    print!(
        "{}",
        status_text(order.as_ref(), progress.as_ref(), now_ms())
    );
    Ok(())
}

fn status_text(order: Option<&Order>, progress: Option<&Progress>, now: i64) -> String {
    let Some(o) = order else {
        return "no emergency collection was ordered\n".into();
    };
    let state = if o.is_active(now) {
        format!("active until {}", rfc3339(o.ends_ms()))
    } else {
        format!("{} at {}", o.end_reason(), rfc3339(o.ends_ms()))
    };
    let mut out = format!(
        "emergency {}: policy {}, {state}\n  reason: {}\n  started: {}\n",
        o.id,
        o.policy,
        o.reason,
        rfc3339(o.started_ms)
    );
    match progress.filter(|p| p.id == o.id) {
        None => out.push_str("  gateway: not picked up yet\n"),
        Some(Progress { report: None, .. }) => out.push_str("  gateway: collecting\n"),
        Some(Progress {
            report: Some(r), ..
        }) => out.push_str(&format!(
            "  gateway: ended ({}) at {}: produced {} batches, delivered {}, purged {}, evicted {}, {} records discarded unsealed\n",
            r.end,
            rfc3339(r.ended_ms),
            r.produced_batches,
            r.delivered_batches,
            r.purged_batches,
            r.evicted_batches,
            r.discarded_records
        )),
    }
    out
}
