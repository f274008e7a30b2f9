//! Home Assistant's MQTT discovery: one retained device message that makes the station appear
//! with its entities (the last report, its severity and counts, an alert sensor, an event entity
//! per declared tool, buttons for the commands), sent on every connection and again whenever Home
//! Assistant announces itself on `<prefix>/status`; an empty retained message removes the device.

use serde_json::{json, Map, Value};

use crate::config::Config;

/// The device discovery topic, `<prefix>/device/outpost_<station>/config`.
pub fn config_topic(config: &Config) -> String {
    format!("{}/device/{}/config", config.home_assistant.discovery_prefix, node_id(config))
}

/// Where Home Assistant says `online` when it (re)starts.
pub fn birth_topic(config: &Config) -> String {
    format!("{}/status", config.home_assistant.discovery_prefix)
}

fn node_id(config: &Config) -> String {
    format!("outpost_{}", config.station.id.replace('-', "_"))
}

/// The device message. Entities read the station's own topics; nothing new is published for them.
pub fn discovery_payload(config: &Config) -> String {
    let root = config.topic_root();
    let node = node_id(config);
    let version = env!("CARGO_PKG_VERSION");
    let mut components = Map::new();
    let mut add = |key: &str, component: Value| {
        let mut component = component;
        component["unique_id"] = json!(format!("{node}_{key}"));
        components.insert(key.to_owned(), component);
    };
    let report = format!("{root}/report");
    add(
        "report",
        json!({"p": "sensor", "name": "Last report", "icon": "mdi:cctv", "state_topic": report,
               "value_template": "{{ value_json.summary[:250] }}", "json_attributes_topic": report}),
    );
    for (key, name, icon) in [
        ("severity", "Severity", "mdi:alert-decagram"),
        ("people", "People", "mdi:account-group"),
        ("vehicles", "Vehicles", "mdi:car"),
        ("hazards", "Hazards", "mdi:fire-alert"),
    ] {
        add(
            key,
            json!({"p": "sensor", "name": name, "icon": icon, "state_topic": report,
                   "value_template": format!("{{{{ value_json.{key} }}}}"), "state_class": "measurement"}),
        );
    }
    let alert = format!("{root}/alert");
    add(
        "alert",
        json!({"p": "binary_sensor", "name": "Alert", "device_class": "problem", "state_topic": alert,
               "value_template": "ON", "off_delay": 300, "json_attributes_topic": alert}),
    );
    if config.thumbnails.enabled {
        add(
            "thumbnail",
            json!({"p": "image", "name": "Thumbnail", "image_topic": format!("{root}/thumbnail"),
                   "image_encoding": "b64", "content_type": "image/jpeg"}),
        );
    }
    for tool in &config.tools {
        let name = tool.name.as_str();
        add(
            &format!("tool_{name}"),
            json!({"p": "event", "name": format!("Tool call {name}"), "icon": "mdi:tools",
                   "state_topic": format!("{root}/tool/{name}"), "event_types": [name],
                   "value_template": format!("{{\"event_type\": \"{name}\"}}")}),
        );
    }
    for command in ["capture-now", "pause", "resume", "reload"] {
        if config.commands.allowed.iter().any(|allowed| allowed == command) {
            add(
                &command.replace('-', "_"),
                json!({"p": "button", "name": title(command), "command_topic": format!("{root}/cmd/{command}"),
                       "payload_press": "{}"}),
            );
        }
    }
    let device = json!({
        "dev": {"ids": [node], "name": format!("Outpost {}", config.station.id), "mf": "Outpost",
                "mdl": "outpostd", "sw": version},
        "o": {"name": "outpostd", "sw": version, "url": "https://github.com/outpost-sentinel/outpost"},
        "availability_topic": format!("{root}/status"),
        "payload_available": "online",
        "payload_not_available": "offline",
        "cmps": components,
    });
    device.to_string()
}

fn title(command: &str) -> String {
    let text = command.replace('-', " ");
    let mut chars = text.chars();
    chars.next().map(|first| first.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_device_names_its_entities_and_reads_the_stations_topics() {
        let toml = r#"
[station]
id = "north-gate"
[camera]
source = "mjpeg"
path = "builtin:people.mjpeg"
[home_assistant]
enabled = true
[commands]
allowed = ["capture-now", "pause"]
"#;
        let config = crate::config::parse(toml, Path::new("t.toml"), Path::new(".")).unwrap();
        assert_eq!(config_topic(&config), "homeassistant/device/outpost_north_gate/config");
        let device: Value = serde_json::from_str(&discovery_payload(&config)).unwrap();
        assert_eq!(device["dev"]["ids"][0], "outpost_north_gate");
        assert_eq!(device["availability_topic"], "outpost/north-gate/status");
        let components = device["cmps"].as_object().unwrap();
        assert_eq!(components["report"]["state_topic"], "outpost/north-gate/report");
        assert_eq!(components["alert"]["p"], "binary_sensor");
        assert_eq!(components["capture_now"]["command_topic"], "outpost/north-gate/cmd/capture-now");
        assert!(!components.contains_key("reload"), "not allowed, so no button");
        let ids: Vec<&str> = components.values().map(|c| c["unique_id"].as_str().unwrap()).collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "{ids:?}");
    }
}
