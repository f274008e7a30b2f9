//! Home Assistant's MQTT discovery against a real mosquitto: the station's device is announced
//! (retained) on connect and again when Home Assistant comes online, and removed on request.

mod common;

use std::time::{Duration, SystemTime};

use common::{write_config, Daemon, Mosquitto, Subscriber, CLIP_CAMERA};

const WAIT: Duration = Duration::from_secs(20);
const CONFIG_TOPIC: &str = "homeassistant/device/outpost_ha_gate/config";

#[test]
fn the_device_is_announced_again_when_home_assistant_starts_and_removed_on_request() {
    let broker = Mosquitto::start();
    let mut client = Subscriber::connect(broker.port, "#");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{CLIP_CAMERA}loop = true\n[home_assistant]\nenabled = true\n");
    let _daemon = Daemon::run_config(&write_config(dir.path(), "ha-gate", broker.port, &extra));

    let announced = client.wait_for("the device", WAIT, |m| m.topic == CONFIG_TOPIC);
    let device = announced.json();
    assert_eq!(device["availability_topic"], "outpost/ha-gate/status");
    assert_eq!(device["cmps"]["pause"]["command_topic"], "outpost/ha-gate/cmd/pause");
    // Retained: a Home Assistant that connects later finds it.
    let mut late = Subscriber::connect(broker.port, CONFIG_TOPIC);
    assert!(late.wait_for("the retained device", WAIT, |m| m.topic == CONFIG_TOPIC).retained);

    client.publish("homeassistant/status", "online");
    let again = client.wait_for("the device announced again", WAIT, |m| m.topic == CONFIG_TOPIC);
    assert_eq!(again.payload, announced.payload);

    // A button press reaches the station like any command.
    client.publish("outpost/ha-gate/cmd/pause", "{}");
    let reply = client.wait_for("the pause reply", WAIT, |m| m.topic == "outpost/ha-gate/cmd/pause/reply").json();
    assert_eq!(reply["ok"], true, "{reply}");

    client.publish("outpost/ha-gate/cmd/forget-home-assistant", "");
    let removal = client.wait_for("the removal", WAIT, |m| m.topic == CONFIG_TOPIC);
    assert!(removal.payload.is_empty(), "{}", removal.payload);
    let reply =
        client.wait_for("the reply", WAIT, |m| m.topic == "outpost/ha-gate/cmd/forget-home-assistant/reply").json();
    assert_eq!(reply["ok"], true, "{reply}");
    let after = SystemTime::now();
    client.publish("homeassistant/status", "online");
    std::thread::sleep(Duration::from_secs(2));
    let announced_again = client.received().iter().any(|m| m.topic == CONFIG_TOPIC && m.received_at > after);
    assert!(!announced_again, "a removed device is not announced again");
}

#[test]
fn without_the_setting_nothing_goes_to_home_assistant() {
    let broker = Mosquitto::start();
    let mut client = Subscriber::connect(broker.port, "#");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{CLIP_CAMERA}loop = true\n");
    let _daemon = Daemon::run_config(&write_config(dir.path(), "private", broker.port, &extra));
    client.wait_for("an event", WAIT, |m| m.topic == "outpost/private/events");
    client.publish("homeassistant/status", "online");
    std::thread::sleep(Duration::from_secs(1));
    let leaked: Vec<_> =
        client.received().iter().filter(|m| m.topic.starts_with("homeassistant/device")).cloned().collect();
    assert!(leaked.is_empty(), "{leaked:?}");
}
