//! The installed service on a field kit: the package, with a config and a model bundle put in place
//! by `deploy/deploy.sh`. A scene request answered end to end through the station's own broker,
//! the station riding out a camera unplug without a restart, and systemd's watchdog restarting a
//! daemon that stopped making progress. Each needs the service running and root (to read the
//! config, stop the daemon, unplug the camera); without them it passes after saying what it
//! skipped and why.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost::config::{CameraSourceKind, Config};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

mod common;
use common::{service_is_running, service_property, skip};

const CONFIG: &str = "/etc/outpost/outpostd.toml";

/// The running service's config, when this test can work with it.
fn running_station(test: &str) -> Option<Config> {
    if !service_is_running() {
        skip(test, "the outpostd service is not running here (install the package, then deploy/deploy.sh a config and a model bundle)");
        return None;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "needs root (sudo -E cargo test -p outpost-hw-tests)");
        return None;
    }
    Some(
        outpost::config::load(Path::new(CONFIG))
            .unwrap_or_else(|e| panic!("the service runs with a config that does not load: {e}")),
    )
}

/// Polls a property of the service until `wanted` holds; its last value either way.
fn wait_for_property(name: &str, timeout: Duration, wanted: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let value = service_property(name);
        if wanted(&value) {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(value);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_scene_request_is_answered_with_a_report_through_the_stations_broker() {
    let test = "scene request";
    let Some(config) = running_station(test) else { return };
    if config.model.is_none() {
        return skip(test, "the station's config has no [model] to look with");
    }
    if config.mqtt.tls.is_some() {
        return skip(test, "the station's broker takes TLS; this test speaks plain MQTT");
    }
    let base = format!("{}/{}", config.station.topic_prefix, config.station.id);
    let mut options =
        MqttOptions::new(format!("outpost-hw-test-{}", std::process::id()), &config.mqtt.host, config.mqtt.port);
    options.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20);
    if let (Some(user), Some(password)) = (&config.mqtt.username, &config.mqtt.password) {
        options.set_credentials(user, password);
    }
    let (client, mut connection) = Client::new(options, 16);
    client.subscribe(format!("{base}/report"), QoS::AtLeastOnce).unwrap();
    client.subscribe(format!("{base}/cmd/capture-now/reply"), QoS::AtLeastOnce).unwrap();

    let request_id = format!("hw-test-{}", std::process::id());
    let (mut asked_at, mut report, mut reply) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(180);
    while reply.is_none() {
        assert!(Instant::now() < deadline, "no reply to capture-now within 180 s (reports seen: {report:?})");
        let event = match connection.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(event)) => event,
            Ok(Err(e)) => panic!("the station's broker {}:{}: {e}", config.mqtt.host, config.mqtt.port),
            Err(_) => continue,
        };
        match event {
            // Both subscriptions are in place: ask.
            Event::Incoming(Packet::SubAck(ack)) if ack.pkid == 2 => {
                client
                    .publish(
                        format!("{base}/cmd/capture-now"),
                        QoS::AtLeastOnce,
                        false,
                        format!(r#"{{"id":"{request_id}"}}"#),
                    )
                    .unwrap();
                asked_at = Some(Instant::now());
            }
            Event::Incoming(Packet::Publish(message)) => {
                let json: serde_json::Value =
                    serde_json::from_slice(&message.payload).expect("the station publishes JSON");
                if message.topic.ends_with("/report") && json["trigger"]["kind"] == "command" {
                    report = Some(json);
                } else if message.topic.ends_with("/reply") && json["id"] == request_id.as_str() {
                    reply = Some(json);
                }
            }
            _ => {}
        }
    }
    let took = asked_at.expect("asked").elapsed();
    let reply = reply.unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let report = report.expect("the report comes before the reply");
    assert!(reply["message"].as_str().unwrap_or_default().contains(report["id"].as_str().unwrap()), "{reply}");
    println!("report {} in {:.1} s: {}", report["id"], took.as_secs_f64(), report["summary"]);
    println!("timing: {}", report["timing"]);
}

/// The USB device (not one of its interfaces) a V4L2 node belongs to, in sysfs.
fn usb_device_of(node: &Path) -> Option<PathBuf> {
    let name = std::fs::canonicalize(node).ok()?.file_name()?.to_owned();
    let device = std::fs::canonicalize(Path::new("/sys/class/video4linux").join(name).join("device")).ok()?;
    device
        .ancestors()
        .find(|dir| dir.join("idVendor").is_file() && dir.join("authorized").is_file())
        .map(Path::to_owned)
}

#[test]
fn the_station_rides_out_a_camera_unplug_without_a_restart() {
    let test = "camera unplug";
    let Some(config) = running_station(test) else { return };
    let Some(camera) = config.camera.filter(|c| c.source == CameraSourceKind::V4l2) else {
        return skip(test, "the station's camera is not a V4L2 (USB) camera");
    };
    let node = PathBuf::from(camera.device.expect("a v4l2 camera names its device"));
    let Some(usb) = usb_device_of(&node) else {
        return skip(test, &format!("{} is not a USB device this test can unplug", node.display()));
    };
    // STATUS= comes every quarter of the watchdog interval (22.5 s with the packaged unit).
    let status_wait = Duration::from_secs(90);
    wait_for_property("StatusText", status_wait, |s| s.contains("camera online"))
        .unwrap_or_else(|s| panic!("the camera is not online before the unplug: {s}"));
    let (pid, restarts) = (service_property("MainPID"), service_property("NRestarts"));

    // Unplugged in software: the kernel deauthorizes the device, as when its cable is pulled.
    std::fs::write(usb.join("authorized"), "0").unwrap();
    let offline = wait_for_property("StatusText", status_wait, |s| s.contains("camera offline"));
    std::fs::write(usb.join("authorized"), "1").unwrap();
    let offline = offline.unwrap_or_else(|s| panic!("the station did not notice the unplug: {s}"));
    println!("unplugged: {offline}");
    let online = wait_for_property("StatusText", status_wait, |s| s.contains("camera online"))
        .unwrap_or_else(|s| panic!("the camera did not come back: {s}"));
    println!("plugged in again: {online}");
    assert_eq!(
        (service_property("MainPID"), service_property("NRestarts")),
        (pid, restarts),
        "the daemon was restarted"
    );
}

#[test]
fn the_watchdog_restarts_a_daemon_that_stopped_making_progress() {
    let test = "watchdog";
    if running_station(test).is_none() {
        return;
    }
    let watchdog_usec: u64 = service_property("WatchdogUSec").parse().unwrap_or(0);
    if watchdog_usec == 0 {
        return skip(test, "the unit has no WatchdogSec");
    }
    let (pid, restarts) = (service_property("MainPID"), service_property("NRestarts"));
    // A stopped process sends no heartbeat at all: the wedge a test can make from outside. One
    // wedged stage withholds the pings the same way (the heartbeats are unit-tested).
    let stopped = std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert!(stopped.success());
    let started = Instant::now();
    let limit = Duration::from_micros(watchdog_usec) + Duration::from_secs(240);
    let restarted = wait_for_property("NRestarts", limit, |n| n != restarts);
    let new_pid = service_property("MainPID");
    if restarted.is_err() {
        let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
        panic!("systemd did not restart the stopped daemon within {limit:?}");
    }
    println!("restarted by the watchdog {:.0} s after the daemon stopped", started.elapsed().as_secs_f64());
    assert_ne!(new_pid, pid);
    wait_for_property("ActiveState", Duration::from_secs(240), |s| s == "active")
        .unwrap_or_else(|s| panic!("the restarted daemon did not become ready: {s}"));
}
