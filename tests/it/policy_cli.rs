//! The policy surface of the `citygate` binary (issue 11 items 1 and 8): `check` rejects
//! bad policies with file, line and key; `policy explain` and `catalog` cover every polled
//! field of every shipped config.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use citygate::config::GatewayConfig;
use citygate::reading::Stream;

fn citygate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_citygate"))
}

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The example gateway config in a temp dir, with a copy of the shipped policies in
/// `policies/` that `edit_policy` may change and `edit_config` applied to the config.
fn with_policies(
    edit_policy: impl Fn(&Path),
    edit_config: impl Fn(&str) -> String,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    for entry in std::fs::read_dir(manifest().join("config/policies")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, policies.join(p.file_name().unwrap())).unwrap();
    }
    edit_policy(&policies);
    let profiles = manifest().join("firmware-profiles");
    let text = std::fs::read_to_string(manifest().join("config/gateway.example.toml"))
        .unwrap()
        .replace(
            "profiles_dir = \"../firmware-profiles\"",
            &format!("profiles_dir = {:?}", profiles.display().to_string()),
        );
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, edit_config(&text)).unwrap();
    (dir, path)
}

fn check(config: &Path) -> Output {
    citygate()
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

/// 1-based line of the first line of `file` containing `needle`.
fn line_of(file: &Path, needle: &str) -> usize {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {}", file.display()))
        + 1
}

/// 1-based line of the last line of `text` starting with `prefix`.
fn last_line_of(text: &str, prefix: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    lines.iter().rposition(|l| l.starts_with(prefix)).unwrap() + 1
}

/// `check` exits 64 and names `file:line:` and `key` in its error.
fn assert_located(out: &Output, file: &Path, line: usize, key: &str, also: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let at = format!("{}:{line}:", file.display());
    let hit = stderr
        .lines()
        .find(|l| l.contains(&at))
        .unwrap_or_else(|| panic!("no error at {at}:\n{stderr}"));
    assert!(hit.contains(&format!("`{key}`")), "key {key}: {hit}");
    assert!(hit.contains(also), "{also:?}: {hit}");
    assert!(hit.contains("valid"), "says what is valid: {hit}");
}

/// Appends `rule` to the shipped policy `name` in `dir`.
fn append_rule(dir: &Path, name: &str, rule: &str) {
    let path = dir.join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n{rule}")).unwrap();
}

/// Issue 11 acceptance, third bullet, and item 1: a policy rule naming a field no profile
/// has (a typo that would silently send nothing) is a `check` error at the rule's `field`.
#[test]
fn check_rejects_a_policy_field_no_profile_has() {
    let (dir, config) = with_policies(
        |p| {
            let path = p.join("billing.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(
                &path,
                text.replacen("\"energy_export\"", "\"energy_exprot\"", 1),
            )
            .unwrap();
        },
        |t| t.to_string(),
    );
    let file = dir.path().join("policies/billing.toml");
    let line = line_of(&file, "energy_exprot");
    assert_located(
        &check(&config),
        &file,
        line,
        "rule[1].field",
        "`energy_exprot` is not a known field of any profile",
    );
}

/// Issue 11 item 1: impossible combinations are `check` errors with file:line and key:
/// aggregating a text identifier, and `delta` on a field that is not a counter.
#[test]
fn check_rejects_impossible_policy_combinations() {
    let (dir, config) = with_policies(
        |p| {
            append_rule(
                p,
                "grid-operation",
                "[[rule]]\nfield = \"serial_number\"\naction = \"aggregate\"\nfunction = \"last\"\nwindow = \"1h\"\n",
            );
            append_rule(
                p,
                "billing",
                "[[rule]]\nfield = \"active_power\"\naction = \"aggregate\"\nfunction = \"delta\"\nwindow = \"1d\"\n",
            );
        },
        |t| t.to_string(),
    );
    let out = check(&config);
    let grid = dir.path().join("policies/grid-operation.toml");
    let text = std::fs::read_to_string(&grid).unwrap();
    let rules = text.matches("[[rule]]").count();
    assert_located(
        &out,
        &grid,
        last_line_of(&text, "action ="),
        &format!("rule[{}].action", rules - 1),
        "serial_number",
    );
    let billing = dir.path().join("policies/billing.toml");
    let text = std::fs::read_to_string(&billing).unwrap();
    let rules = text.matches("[[rule]]").count();
    assert_located(
        &out,
        &billing,
        last_line_of(&text, "function ="),
        &format!("rule[{}].function", rules - 1),
        "not a counter",
    );
}

/// Issue 11 items 1 and 2: a flow naming a policy file that does not exist is a `check`
/// error at `[policies] flows` in the gateway config, listing the files there are.
#[test]
fn check_rejects_a_missing_policy_file() {
    let (dir, config) = with_policies(
        |_| {},
        |t| {
            t.replacen(
                "flows = [\"billing\",",
                "flows = [\"no-such-purpose\", \"billing\",",
                1,
            )
        },
    );
    let out = check(&config);
    let line = line_of(&config, "no-such-purpose");
    assert_located(
        &out,
        &config,
        line,
        "policies.flows",
        "no-such-purpose.toml",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("billing"), "lists what exists: {stderr}");
    drop(dir);
}

/// Every shipped gateway config.
fn shipped_configs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(manifest().join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("gateway") && name.ends_with(".toml")
        })
        .collect();
    out.sort();
    assert!(out.len() >= 3, "{out:?}");
    out
}

/// The flows a field of `stream` is decided under: the purpose flows for readings, the
/// alarms policy for alarms.
fn flows_for(cfg: &GatewayConfig, stream: Stream) -> BTreeSet<String> {
    let flows: Vec<_> = if stream == Stream::Alarms {
        cfg.policies.alarms.iter().collect()
    } else {
        cfg.policies.flows.iter().collect()
    };
    flows.iter().map(|f| f.policy.name().to_string()).collect()
}

fn run_ok(args: &[&str], config: &Path) -> String {
    let out = citygate()
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} {}: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Issue 11 acceptance, third bullet (item 8): `citygate policy explain` on every shipped
/// gateway config exits 0 and lists, for every device, every field its profile polls with
/// one decision per flow that sees the field.
#[test]
fn policy_explain_lists_every_polled_field_with_a_decision_per_flow() {
    for config in shipped_configs() {
        let cfg = GatewayConfig::load(&config).unwrap_or_else(|e| panic!("{e}"));
        let text = run_ok(&["policy", "explain"], &config);
        // (device, field) → flows with a decision line.
        let mut listed: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        let (mut device, mut field) = (None::<String>, None::<String>);
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("device ") {
                device = Some(rest.split(' ').next().unwrap().to_string());
                field = None;
            } else if let Some(rest) = line.strip_prefix("    ") {
                let (Some(d), Some(f)) = (&device, &field) else {
                    continue;
                };
                let flow = rest.split_whitespace().next().unwrap().to_string();
                let decision = rest[flow.len()..].trim();
                assert!(
                    decision.starts_with("leaves") || decision.starts_with("does not leave"),
                    "{}: {line}",
                    config.display()
                );
                listed
                    .entry((d.clone(), f.clone()))
                    .or_default()
                    .insert(flow);
            } else if let Some(rest) = line.strip_prefix("  ") {
                if device.is_some() && rest.contains(" [") {
                    field = Some(rest.split(' ').next().unwrap().to_string());
                }
            } else if line.is_empty() {
                field = None;
            }
        }
        let mut expected = 0;
        for d in &cfg.devices {
            for f in &d.profile.fields {
                let key = (d.id.to_string(), f.name.to_string());
                let want = flows_for(&cfg, f.stream);
                let got = listed.get(&key).cloned().unwrap_or_default();
                assert_eq!(got, want, "{}: {key:?}", config.display());
                expected += 1;
            }
        }
        assert_eq!(
            listed.len(),
            expected,
            "{}: extra entries",
            config.display()
        );
    }
}

/// Issue 11 acceptance, third bullet (item 8): `citygate catalog --format json|csv` on
/// every shipped gateway config exits 0 with one entry per flow listing every distinct
/// field the configured devices produce, each with a sharing decision; the CSV has one
/// row per flow × field.
#[test]
fn catalog_lists_every_field_per_flow_as_json_and_csv() {
    for config in shipped_configs() {
        let cfg = GatewayConfig::load(&config).unwrap_or_else(|e| panic!("{e}"));
        let fields: BTreeSet<(String, String)> = cfg
            .devices
            .iter()
            .flat_map(|d| d.profile.fields.iter())
            .map(|f| (f.name.to_string(), format!("{:?}", f.class)))
            .collect();
        let names: BTreeSet<String> = fields.iter().map(|(n, _)| n.clone()).collect();
        let flows: Vec<String> = cfg
            .policies
            .flows
            .iter()
            .chain(&cfg.policies.alarms)
            .chain(cfg.policies.emergency.iter().map(|(_, f)| f))
            .map(|f| f.policy.name().to_string())
            .collect();

        let json: serde_json::Value =
            serde_json::from_str(&run_ok(&["catalog", "--format", "json"], &config)).unwrap();
        let entries = json.as_array().unwrap();
        let purposes: Vec<&str> = entries
            .iter()
            .map(|e| e["purpose"].as_str().unwrap())
            .collect();
        assert_eq!(purposes, flows, "{}", config.display());
        for e in entries {
            let items = e["items"].as_array().unwrap();
            assert_eq!(
                items.len(),
                fields.len(),
                "{}: {}",
                config.display(),
                e["purpose"]
            );
            let got: BTreeSet<String> = items
                .iter()
                .map(|i| i["field"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(got, names, "{}: {}", config.display(), e["purpose"]);
            let emergency = e["stream"] == "readings-7";
            assert_eq!(
                e["collection"],
                if emergency { "emergency" } else { "standing" },
                "{e}"
            );
            for i in items {
                let shared = !i["forms"].as_array().unwrap().is_empty();
                match i["sharing"].as_str().unwrap() {
                    "not_shared" => assert!(!shared, "{i}"),
                    "conditional" | "unconditional" => assert!(shared, "{i}"),
                    other => panic!("sharing {other}: {i}"),
                }
            }
        }
        // Decisions are real: each shipped config shares something under some flow.
        let shares = |e: &serde_json::Value| {
            e["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["sharing"] != "not_shared")
        };
        assert!(entries.iter().any(shares), "{}", config.display());

        let csv = run_ok(&["catalog", "--format", "csv"], &config);
        let mut lines = csv.lines();
        let header = lines.next().unwrap();
        assert!(header.starts_with("purpose,stream,"), "{header}");
        let rows: Vec<&str> = lines.collect();
        assert_eq!(
            rows.len(),
            flows.len() * fields.len(),
            "{}",
            config.display()
        );
        for flow in &flows {
            let n = rows
                .iter()
                .filter(|r| r.starts_with(&format!("{flow},")))
                .count();
            assert_eq!(n, fields.len(), "{}: {flow}", config.display());
        }
    }
}
