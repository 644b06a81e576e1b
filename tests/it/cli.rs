//! The `citygate` binary's operator surface: exit codes and located errors.

use std::path::Path;
use std::process::Command;

fn citygate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_citygate"))
}

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.example.toml")
}

#[test]
fn check_accepts_the_example_and_shows_dispositions() {
    let out = citygate()
        .args(["check", "--config"])
        .arg(example())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "feeder-7-household-101",
        "chint-ddsu666",
        "billing: aggregate delta 1d",
        "grid-operation: aggregate mean 15m over area (sum, k=5)",
        "dropped (no purpose names it)",
        "polls FC",
        "purpose   billing on stream readings:",
        "purpose   grid-operation on stream readings-1:",
        "approve   at the hub, [[gateway]] id = \"county-demo-gw-001\": policies = [{ purpose = \"billing\", hash = \"",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

/// Writes the example config with one edit into a temp dir whose profiles_dir points
/// at the shipped profiles.
fn edited_example(edit: impl Fn(&str) -> String) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles");
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace(
            "profiles_dir = \"../firmware-profiles\"",
            &format!("profiles_dir = {:?}", profiles.display().to_string()),
        )
        .replace(
            "\nflows = [",
            &format!("\ndir = {:?}\nflows = [", policies.display().to_string()),
        );
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, edit(&text)).unwrap();
    (dir, path)
}

#[test]
fn check_rejects_an_unknown_key_with_file_line_and_key() {
    let (_dir, path) =
        edited_example(|t| t.replacen("unit = 2\n", "unit = 2\nbaudrate = 9600\n", 1));
    let out = citygate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("baudrate"))
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!("{}:{line}:", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("baudrate"), "{stderr}");
}

#[test]
fn check_rejects_a_bad_register_type_in_a_profile() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles");
    let profiles = dir.path().join("profiles");
    std::fs::create_dir(&profiles).unwrap();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            std::fs::copy(&p, profiles.join(p.file_name().unwrap())).unwrap();
        }
    }
    let broken = profiles.join("chint-ddsu666.toml");
    let text = std::fs::read_to_string(&broken).unwrap();
    let first_type = text
        .find("type = \"f32\"")
        .expect("profile has an f32 field");
    let edited = format!(
        "{}type = \"f24\"{}",
        &text[..first_type],
        &text[first_type + "type = \"f32\"".len()..]
    );
    std::fs::write(&broken, &edited).unwrap();
    let line = edited[..first_type].matches('\n').count() + 1;

    let cfg = std::fs::read_to_string(example()).unwrap().replace(
        "profiles_dir = \"../firmware-profiles\"",
        "profiles_dir = \"profiles\"",
    );
    let cfg_path = dir.path().join("gw.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = citygate()
        .args(["check", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:{line}:", broken.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(".type`") && stderr.contains("\"f32\""),
        "names the key and what is valid: {stderr}"
    );
}

#[test]
fn bad_usage_exits_64() {
    let out = citygate().args(["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = citygate().args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// Issue 12 item 1: `keys gen` needs a role (the usage error names both), writes only that
/// role's keys (secrets 0600), never into a folder holding the other role's secrets, and a
/// refusal to overwrite names `--force`.
#[test]
fn keys_gen_writes_one_role_per_folder_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let gen = |role: &[&str], dir: &std::path::Path| {
        citygate()
            .args(["keys", "gen"])
            .args(role)
            .arg("--dir")
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = gen(&[], &keys);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--role gateway") && stderr.contains("--role hub"),
        "{stderr}"
    );
    assert!(!keys.exists(), "nothing written without a role");
    let out = gen(&["--role", "gateway"], &keys);
    assert!(out.status.success(), "{out:?}");
    let mut written: Vec<_> = std::fs::read_dir(&keys)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    written.sort();
    assert_eq!(
        written,
        ["gateway.sign.key", "gateway.sign.pub", "pseudonym.key"]
    );
    for secret in ["gateway.sign.key", "pseudonym.key"] {
        let mode = std::fs::metadata(keys.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }
    let again = gen(&["--role", "gateway"], &keys);
    assert_eq!(again.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{again:?}"
    );
    for force in [&["--role", "hub"][..], &["--role", "hub", "--force"]] {
        let mixed = gen(force, &keys);
        assert_eq!(mixed.status.code(), Some(64), "{mixed:?}");
        assert!(!keys.join("hub.hpke.key").exists());
    }
    let out = gen(&["--role", "hub"], &dir.path().join("hub-keys"));
    assert!(out.status.success(), "{out:?}");
    assert!(dir.path().join("hub-keys/hub.ack.key").exists());
    assert!(!dir.path().join("hub-keys/gateway.sign.key").exists());
}

/// Issue 12 item 2: `keys import` refuses a secret key file and a changed export (exit 64,
/// nothing written), and `keys show` flags a secret key readable by others.
#[test]
fn keys_import_refuses_secrets_and_changed_exports_and_show_checks_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = |rel: &str| dir.path().join(rel);
    let keys = |args: &[&std::ffi::OsStr]| citygate().arg("keys").args(args).output().unwrap();
    for (role, folder) in [("hub", "hub-keys"), ("gateway", "keys")] {
        let out = keys(&[
            "gen".as_ref(),
            "--role".as_ref(),
            role.as_ref(),
            "--dir".as_ref(),
            p(folder).as_ref(),
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    let export = keys(&[
        "export".as_ref(),
        "--dir".as_ref(),
        p("hub-keys").as_ref(),
        "--out".as_ref(),
        p("hub.pub").as_ref(),
    ]);
    assert!(export.status.success(), "{export:?}");
    let text = std::fs::read_to_string(p("hub.pub")).unwrap();
    let key_line = text.lines().nth(2).unwrap();
    let (slug, hex) = key_line.split_once(' ').unwrap();
    let other = if hex.starts_with('0') { "1" } else { "0" };
    std::fs::write(
        p("changed.pub"),
        text.replace(key_line, &format!("{slug} {other}{}", &hex[1..])),
    )
    .unwrap();
    for (from, needle) in [
        (p("hub-keys/hub.hpke.key"), "secret key file"),
        (p("changed.pub"), "does not match"),
    ] {
        let out = keys(&[
            "import".as_ref(),
            "--from".as_ref(),
            from.as_ref(),
            "--dir".as_ref(),
            p("keys").as_ref(),
        ]);
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{out:?}"
        );
        assert!(!p("keys/hub.hpke.pub").exists());
    }
    std::fs::set_permissions(
        p("keys/pseudonym.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let show = keys(&["show".as_ref(), "--dir".as_ref(), p("keys").as_ref()]);
    assert_eq!(show.status.code(), Some(64), "{show:?}");
    let stdout = String::from_utf8_lossy(&show.stdout);
    assert!(
        stdout.contains("pseudonym.key") && stdout.contains("chmod 600"),
        "{stdout}"
    );
}

#[test]
fn demo_delivers_every_record_through_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let out = citygate()
        .args([
            "demo",
            "--duration",
            "10s",
            "--meters",
            "1",
            "--summary-json",
        ])
        .arg(&summary)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    for key in [
        "readings_polled",
        "records_sealed",
        "batches_committed",
        "batches_acked",
        "hub_records_written",
        "hub_duplicates_dropped",
        "hub_rejected",
        "outage_batches_buffered",
        "records_lost",
    ] {
        assert!(s[key].is_u64(), "{key} missing: {s}");
    }
    assert!(s["records_sealed"].as_u64().unwrap() > 0);
    assert_eq!(s["hub_records_written"], s["records_sealed"]);
    assert_eq!(s["records_lost"], 0);
    assert_eq!(s["hub_rejected"], 0);
    assert!(s["outage_batches_buffered"].as_u64().unwrap() > 0, "{s}");
}
