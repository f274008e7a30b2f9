//! `outpostd demo`: the whole pipeline on the built-in sample media, from `configs/demo.toml`.

use std::path::Path;

use crate::config::{self, Config, ConfigError};

/// `configs/demo.toml`, compiled in so that the demo runs from any directory.
pub const DEMO_TOML: &str = include_str!("../../configs/demo.toml");

/// The demo config, pointed at the broker at `host:port`.
pub fn config(host: &str, port: u16) -> Result<Config, ConfigError> {
    let mut config = config::parse(DEMO_TOML, Path::new("configs/demo.toml (built in)"), Path::new("."))?;
    config.mqtt.host = host.into();
    config.mqtt.port = port;
    Ok(config)
}
