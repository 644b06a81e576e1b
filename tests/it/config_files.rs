//! Every file in `config/` loads, so no shipped example can rot.

use std::path::Path;

use citygate::config::GatewayConfig;
use citygate::hub::HubConfig;

#[test]
fn every_shipped_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut loaded = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("gateway") {
            let cfg = GatewayConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!cfg.devices.is_empty(), "{name} configures no device");
            loaded += 1;
        } else if name.starts_with("hub") {
            let cfg = HubConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!cfg.gateways.is_empty(), "{name} registers no gateway");
            loaded += 1;
        } else {
            panic!("config/{name}: no loader knows this file; add it to this test");
        }
    }
    assert!(loaded >= 2);
}
