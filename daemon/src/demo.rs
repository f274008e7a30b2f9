//! `outpostd demo`: the whole pipeline on the built-in sample media, from `configs/demo.toml`.

use std::path::Path;

use crate::config::{self, Config, ConfigError};

/// `configs/demo.toml`, compiled in so that the demo runs from any directory.
pub const DEMO_TOML: &str = include_str!("../../configs/demo.toml");

/// The demo config, pointed at the broker at `host:port`. Its model is the tiny one in the
/// source tree this binary was built from; without that tree the demo runs without the model.
pub fn config(host: &str, port: u16) -> Result<Config, ConfigError> {
    let name = Path::new("configs/demo.toml (built in)");
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut config = if configs.join("../daemon/tests/fixtures/gemma4-tiny/manifest.json").is_file() {
        config::parse(DEMO_TOML, name, &configs)?
    } else {
        tracing::warn!("the demo's tiny model is not in {}: running without the model stage", configs.display());
        config::parse(&without_model(DEMO_TOML), name, Path::new("."))?
    };
    config.mqtt.host = host.into();
    config.mqtt.port = port;
    Ok(config)
}

/// The demo's TOML without the tables that need the model.
fn without_model(text: &str) -> String {
    let Ok(mut table) = text.parse::<toml::Table>() else { return text.to_owned() };
    for key in ["model", "analysis", "alerts", "tools"] {
        table.remove(key);
    }
    toml::to_string(&table).unwrap_or_else(|_| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_runs_the_tiny_model_and_without_it_loads_all_the_same() {
        let config = config("127.0.0.1", 1883).unwrap();
        assert!(config.model.is_some() && !config.alerts.is_empty() && !config.tools.is_empty());
        let bare = config::parse(&without_model(DEMO_TOML), Path::new("demo"), Path::new("/")).unwrap();
        assert!(bare.model.is_none() && bare.alerts.is_empty() && bare.tools.is_empty());
        assert_eq!(bare.camera, config.camera);
    }
}
