//! The hub at city scale (issue 13 acceptance): three `citygate hub` processes on one shared
//! subscription, writing to one PostgreSQL database, while simulated gateways re-send after
//! withheld acks and hubs are SIGKILLed and restarted — every record in the database once,
//! every batch a gateway was acknowledged for present whole.

use crate::loadtest_hub::loadtest_hub;
use crate::support::PgServer;

/// Issue 13 items 2 and 4: `citygate loadtest hub --sink postgres --hubs 3 --kill-hubs 3`
/// through mosquitto (or the embedded broker) against a private PostgreSQL: the fleet's
/// accounting finds no duplicate and no acked batch missing, and the database, asked
/// directly, holds each natural key once and exactly the acked batches' records.
#[tokio::test]
async fn three_hubs_killed_at_random_write_every_acked_record_once_in_the_database() {
    let Some(pg) = PgServer::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let (ok, r, said) = loadtest_hub(
        dir.path(),
        &[
            "--sink",
            "postgres",
            "--pg-url",
            &url,
            "--hubs",
            "3",
            "--kill-hubs",
            "3",
            "--seed",
            "1313",
            "--gateways",
            "24",
            "--per-connection",
            "8",
            "--meters",
            "5",
            "--duration",
            "12s",
            "--ack-timeout",
            "1s",
            "--withhold-acks",
            "0.1",
            "--garbage",
            "0.03",
            "--forged",
            "0.03",
        ],
    )
    .await;
    assert!(ok, "loadtest hub failed:\n{said}\n{r:#}");
    assert_eq!(r["sink"], "postgres", "{r:#}");
    let restarts: u64 = r["hub"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["restarts"].as_u64().unwrap())
        .sum();
    assert_eq!(restarts, 3, "{r:#}");
    assert_eq!(r["duplicates_written"], 0, "{r:#}");
    assert_eq!(r["missing_batches"], 0, "{r:#}");
    assert_eq!(r["unexpected_records"], 0, "{r:#}");
    assert_eq!(r["forged_acked"], 0, "{r:#}");
    assert_eq!(r["drained"], true, "{r:#}");
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k}: {r:#}"));
    assert!(n("acked_batches") > 100, "{r:#}");
    assert_eq!(n("unacked_batches"), 0, "{r:#}");
    assert!(n("acks_for_resends") > 0, "re-sends were acked: {r:#}");

    // The database itself: no natural key twice, and exactly what was acknowledged.
    let twice = pg.count(
        "SELECT count(*) FROM (SELECT 1 FROM records GROUP BY gateway, stream, incarnation, \
         seq, subject, field, at HAVING count(*) > 1) d",
    );
    assert_eq!(twice, 0, "records written more than once");
    let batches = pg.count("SELECT count(*) FROM batches");
    let records = pg.count("SELECT count(*) FROM records");
    assert_eq!(u64::try_from(batches).unwrap(), n("acked_batches"), "{r:#}");
    // 5 meters × 6 fields × 1 reading per batch.
    assert_eq!(
        u64::try_from(records).unwrap(),
        n("acked_batches") * 30,
        "{r:#}"
    );
}
