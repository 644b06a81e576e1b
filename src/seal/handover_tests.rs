//! Key roles (`roles.rs`) and the public-key hand-over (`handover.rs`).

use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::seal::keys::{
    load_hub_ack_verifying_key, load_hub_public_key, load_verifying_key, KeyError, KeyKind,
};
use crate::seal::roles::{generate_role, inspect, Fingerprint, Role};

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn boxes() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub-keys");
    let gw = tmp.path().join("gw-keys");
    generate_role(&hub, Role::Hub, false).unwrap();
    generate_role(&gw, Role::Gateway, false).unwrap();
    (tmp, hub, gw)
}

/// Issue 12 item 1: each role gets exactly its own keys, and a folder holding the other
/// role's secret keys is refused, even with overwrite.
#[test]
fn each_role_gets_its_own_keys_and_roles_never_mix_in_one_folder() {
    let (_tmp, hub, gw) = boxes();
    assert_eq!(
        names(&gw),
        ["gateway.sign.key", "gateway.sign.pub", "pseudonym.key"]
    );
    assert_eq!(
        names(&hub),
        ["hub.ack.key", "hub.ack.pub", "hub.hpke.key", "hub.hpke.pub"]
    );
    for dir in [&hub, &gw] {
        for name in names(dir) {
            let info = inspect(&dir.join(&name)).unwrap();
            let expected = if dir == &hub {
                Role::Hub
            } else {
                Role::Gateway
            };
            assert_eq!(info.role, expected, "{name}");
        }
    }
    for (dir, role) in [(&gw, Role::Hub), (&hub, Role::Gateway)] {
        for overwrite in [false, true] {
            let before = names(dir);
            let err = generate_role(dir, role, overwrite).unwrap_err();
            assert!(matches!(err, KeyError::Refused { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("{}'s secret key", role.other())),
                "{msg}"
            );
            assert_eq!(names(dir), before, "nothing written");
        }
    }
    let err = generate_role(&gw, Role::Gateway, false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    let old = inspect(&gw.join("gateway.sign.pub")).unwrap();
    generate_role(&gw, Role::Gateway, true).unwrap();
    assert_ne!(
        inspect(&gw.join("gateway.sign.pub")).unwrap().public,
        old.public
    );
}

/// Issue 12 item 2: the hub's export imported on a gateway and the gateway's imported at the
/// hub land where the configs expect them, with the fingerprints `show` prints on the
/// exporting box.
#[test]
fn export_and_import_round_trip_with_equal_fingerprints() {
    let (tmp, hub, gw) = boxes();
    let hub_keys = PublicKeys::from_dir(&hub, None).unwrap();
    let text = hub_keys.encode();
    assert!(
        text.starts_with("# citygate public-keys v1\nrole hub\n"),
        "{text}"
    );
    let file = tmp.path().join("hub.pub");
    fs::write(&file, &text).unwrap();
    let read = PublicKeys::read(&file).unwrap();
    assert_eq!(read, hub_keys);
    let written = read.install(&gw, false).unwrap();
    for (info, name) in written.iter().zip(["hub.hpke.pub", "hub.ack.pub"]) {
        let there = inspect(&hub.join(name)).unwrap();
        assert_eq!(info.fingerprint(), there.fingerprint(), "{name}");
        assert!(
            text.contains(&there.fingerprint().unwrap().to_string()),
            "{text}"
        );
    }
    assert_eq!(
        load_hub_public_key(&gw.join("hub.hpke.pub"))
            .unwrap()
            .to_bytes(),
        inspect(&hub.join("hub.hpke.key")).unwrap().public.unwrap()
    );
    load_hub_ack_verifying_key(&gw.join("hub.ack.pub")).unwrap();
    // No secret of the hub's reached the gateway.
    assert!(!gw.join("hub.hpke.key").exists() && !gw.join("hub.ack.key").exists());

    let gw_id = crate::reading::GatewayId::new("gw-7").unwrap();
    assert!(
        PublicKeys::from_dir(&gw, None).is_err(),
        "a gateway's export needs its id"
    );
    let gw_keys = PublicKeys::from_dir(&gw, Some(gw_id.clone())).unwrap();
    let file = tmp.path().join("gw-7.pub");
    fs::write(&file, gw_keys.encode()).unwrap();
    let registry = tmp.path().join("gateways");
    let written = PublicKeys::read(&file)
        .unwrap()
        .install(&registry, false)
        .unwrap();
    assert_eq!(written[0].path, registry.join("gw-7.sign.pub"));
    assert_eq!(
        written[0].fingerprint(),
        inspect(&gw.join("gateway.sign.key")).unwrap().fingerprint()
    );
    load_verifying_key(&registry.join("gw-7.sign.pub")).unwrap();
    // Importing again without overwrite is refused and names --force.
    let err = PublicKeys::read(&file)
        .unwrap()
        .install(&registry, false)
        .unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    PublicKeys::read(&file)
        .unwrap()
        .install(&registry, true)
        .unwrap();
}

/// Issue 12 item 2: a changed fingerprint or key, a secret key in any form, the wrong role
/// and an unknown version are refused with a message saying so.
#[test]
fn tampered_secret_and_wrong_role_exports_are_refused() {
    let (tmp, hub, gw) = boxes();
    let good = PublicKeys::from_dir(&hub, None).unwrap().encode();
    let path = tmp.path().join("x.pub");
    let refused = |text: &str, needle: &str| {
        fs::write(&path, text).unwrap();
        let err = PublicKeys::read(&path).unwrap_err();
        assert!(matches!(err, KeyError::Refused { .. }), "{err:?}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    };
    // One key digit changed: its fingerprint no longer matches.
    let line = good.lines().nth(2).unwrap();
    let digit = if line.ends_with('0') { "1" } else { "0" };
    let tampered = good.replace(line, &format!("{}{digit}", &line[..line.len() - 1]));
    refused(&tampered, "does not match");
    let fp_line = good.lines().nth(3).unwrap();
    refused(&good.replace(fp_line, ""), "no fingerprint");
    // A secret key: as a key file, or smuggled into an export.
    let secret_file = fs::read_to_string(hub.join("hub.hpke.key")).unwrap();
    refused(&secret_file, "secret key file");
    let secret_hex = secret_file.lines().nth(1).unwrap();
    refused(
        &format!("{good}hub-ack-signing-key {secret_hex}\n"),
        "holds a secret key",
    );
    refused(
        &fs::read_to_string(gw.join("gateway.sign.pub")).unwrap(),
        "single key file",
    );
    // Wrong role inside, version, missing id.
    let gw_export = PublicKeys::from_dir(&gw, Some(crate::reading::GatewayId::new("g").unwrap()))
        .unwrap()
        .encode();
    refused(&gw_export.replace("role gateway", "role hub"), "wrong role");
    refused(
        &gw_export.replace("gateway g\n", ""),
        "lacks its `gateway` id",
    );
    refused(
        &good.replace("public-keys v1", "public-keys v2"),
        "unknown export version",
    );
    // The right file into the wrong folder.
    let hub_export = PublicKeys::parse(Path::new("hub.pub"), &good).unwrap();
    let err = hub_export.install(&hub, true).unwrap_err();
    assert!(err.to_string().contains("wrong role"), "{err}");
    let gw_keys = PublicKeys::parse(Path::new("g.pub"), &gw_export).unwrap();
    let err = gw_keys.install(&gw, true).unwrap_err();
    assert!(err.to_string().contains("wrong role"), "{err}");
}

#[test]
fn fingerprints_are_sha256_in_groups_starting_with_the_key_id() {
    let fp = Fingerprint::of(&[0; 32]).to_string();
    assert_eq!(
        fp,
        "6668 7aad f862 bd77 6c8f c18b 8e9f 8e20 0897 1485 6ee2 33b3 902a 591d 0d5f 2925"
    );
    assert!(fp
        .replace(' ', "")
        .starts_with(&hex::encode(crate::seal::key_id(&[0; 32]))));
    let info = inspect(Path::new("/nonexistent")).unwrap_err();
    assert!(matches!(info, KeyError::Io { .. }));
    assert_eq!(KeyKind::HubAckVerifying.slug(), "hub-ack-verifying-key");
}
