//! The model stage in the running daemon, on the tiny random-weight Gemma 4 bundle: motion makes
//! the model look, and what it reports, the alerts its reports raise and the tool calls it makes
//! arrive on a real mosquitto, valid against the committed schema and the declared tools;
//! `capture-now` and `ask` work through MQTT commands; tool results come back by id or by MQTT 5
//! correlation data; alerts raised while the broker is down survive a SIGKILL.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{stored_ids, wait_for_ids, write_config, Daemon, Mosquitto, Subscriber, CLIP_CAMERA};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn committed_schema(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn station_config(dir: &Path, station: &str, port: u16) -> std::path::PathBuf {
    let bundle = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny");
    std::fs::create_dir_all(dir.join("protocols")).unwrap();
    std::fs::write(dir.join("protocols/01-gate.md"), "Vehicles stop at the north gate for inspection.\n").unwrap();
    let extra = format!(
        r#"{CLIP_CAMERA}loop = true
[gates.motion]
cooldown_secs = 0.5

[model]
bundle = "{bundle}"
threads = 1

[stats]
interval_secs = 1

[analysis]
triggers = ["motion"]
cooldown_secs = 2
place = "the north gate of a relief camp"
documents = "protocols"
# The random model wanders to the schema's limits: room for a whole report.
max_tokens = 2048
tool_min_severity = 0

# Severity 0 and up: every report of the random model raises it, once per activity.
[[alerts]]
name = "anything"
rearm_secs = 3600

[[tools]]
name = "dispatch_rescue_team"
description = "Send the rescue team to a place."
confirm = true

[tools.parameters.location]
type = "string"
# Bounded, so that a call always ends well within max_tokens.
max_length = 60
description = "Where to go."

[tools.parameters.priority]
type = "integer"
minimum = 1
maximum = 3
description = "1 urgent, 3 routine."
"#,
        bundle = bundle.display()
    );
    write_config(dir, station, port, &extra)
}

#[test]
fn motion_makes_reports_an_alert_and_tool_calls_that_validate() {
    let broker = Mosquitto::start();
    let mut subscriber = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::run_config(&station_config(dir.path(), "looker", broker.port));

    let report_schema = jsonschema::validator_for(&committed_schema("scene-report.v1.json")).unwrap();
    let mut reports = Vec::new();
    while reports.len() < 2 {
        let report = subscriber.wait_for("a scene report", WAIT, |m| m.topic == "outpost/looker/report").json();
        let errors: Vec<String> = report_schema.iter_errors(&report).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{report}");
        assert_eq!(report["trigger"]["kind"], "motion");
        assert_eq!(report["model"]["bundle"], "gemma4-tiny-random", "{report}");
        reports.push(report);
    }
    let log = daemon.stderr();
    assert!(log.contains("tokens of station documents from"), "{log}");
    let stats = subscriber
        .wait_for("figures after a report", WAIT, |m| {
            m.topic == "outpost/looker/stats" && !m.json()["publisher"]["last_report_latency_ms"].is_null()
        })
        .json();
    assert!(stats["model"]["looks"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["model"]["mean_look_ms"].as_u64().unwrap() > 0, "{stats}");
    // From the gate firing to the broker's acknowledgement: the look's own time and more.
    let every_report = subscriber.received().iter().filter(|m| m.topic == "outpost/looker/report").map(|m| m.json());
    let quickest_look = every_report.map(|r| r["timing"]["total_ms"].as_u64().unwrap()).min().unwrap();
    assert!(stats["publisher"]["last_report_latency_ms"].as_u64().unwrap() >= quickest_look, "{stats}");

    let received = subscriber.received().to_vec();
    let alerts: Vec<Value> = received.iter().filter(|m| m.topic == "outpost/looker/alert").map(|m| m.json()).collect();
    assert_eq!(alerts.len(), 1, "one alert for the whole activity: {alerts:?}");
    assert_eq!(alerts[0]["rule"], "anything");
    assert!(reports.iter().any(|r| r["id"] == alerts[0]["report_id"]), "{alerts:?}");

    let calls: Vec<Value> =
        received.iter().filter(|m| m.topic == "outpost/looker/tool/dispatch_rescue_team").map(|m| m.json()).collect();
    assert!(!calls.is_empty(), "a tool call for a report; log:\n{log}");
    for call in &calls {
        assert_eq!(call["tool"], "dispatch_rescue_team");
        assert_eq!(call["confirm"], true);
        let arguments = call["arguments"].as_object().unwrap();
        assert!(arguments["location"].is_string(), "{call}");
        let priority = arguments["priority"].as_i64().unwrap();
        assert!((1..=3).contains(&priority), "{call}");
    }
    assert!(!received.iter().any(|m| m.topic == "outpost/looker/thumbnail"), "thumbnails are off by default");
    let other_tools: Vec<_> = received
        .iter()
        .filter(|m| m.topic.starts_with("outpost/looker/tool/") && !m.topic.ends_with("/dispatch_rescue_team"))
        .collect();
    assert!(other_tools.is_empty(), "{other_tools:?}");
}

#[test]
fn capture_now_and_ask_answer_through_mqtt_commands() {
    let broker = Mosquitto::start();
    let mut client = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let config = station_config(dir.path(), "asked", broker.port);
    // Motion alone would keep the model busy: only commands make it look here.
    let text = std::fs::read_to_string(&config).unwrap().replace("triggers = [\"motion\"]", "triggers = []");
    std::fs::write(&config, text).unwrap();
    let _daemon = Daemon::run_config(&config);
    client.wait_for("a first event", WAIT, |m| m.topic == "outpost/asked/events");

    client.publish("outpost/asked/cmd/capture-now", r#"{"id":"c1"}"#);
    let reply =
        client.wait_for("the capture-now reply", WAIT, |m| m.topic == "outpost/asked/cmd/capture-now/reply").json();
    assert_eq!((reply["ok"].as_bool(), reply["id"].as_str()), (Some(true), Some("c1")), "{reply}");
    let published: Vec<Value> =
        client.received().iter().filter(|m| m.topic == "outpost/asked/report").map(|m| m.json()).collect();
    let report = published.last().expect("the report comes before the reply");
    assert_eq!(report["trigger"]["kind"], "command");
    assert!(reply["message"].as_str().unwrap().contains(report["id"].as_str().unwrap()), "{reply}");

    client.publish("outpost/asked/cmd/ask", r#"{"id":"q1","question":"Is the gate open?"}"#);
    let reply = client.wait_for("the answer", WAIT, |m| m.topic == "outpost/asked/cmd/ask/reply").json();
    assert_eq!((reply["ok"].as_bool(), reply["id"].as_str()), (Some(true), Some("q1")), "{reply}");
    assert!(reply["message"].is_string());
}

#[test]
fn a_station_looks_on_its_schedule_without_a_trigger() {
    let broker = Mosquitto::start();
    let mut subscriber = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let config = station_config(dir.path(), "routine", broker.port);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("triggers = [\"motion\"]", "triggers = []\nschedule_secs = 1")
        .replace("tool_min_severity = 0", "tool_min_severity = 3");
    std::fs::write(&config, text).unwrap();
    let _daemon = Daemon::run_config(&config);
    for _ in 0..2 {
        let report = subscriber.wait_for("a scheduled report", WAIT, |m| m.topic == "outpost/routine/report").json();
        assert_eq!(report["trigger"]["kind"], "schedule", "{report}");
        assert!(report["trigger"]["event_id"].is_null(), "{report}");
    }
}

#[test]
fn a_tool_result_continues_the_conversation_and_malformed_ones_are_refused() {
    let broker = Mosquitto::start();
    let mut client = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let config = station_config(dir.path(), "tooled", broker.port);
    let text = std::fs::read_to_string(&config).unwrap().replace("triggers = [\"motion\"]", "triggers = []");
    std::fs::write(&config, text).unwrap();
    let _daemon = Daemon::run_config(&config);
    client.wait_for("a first event", WAIT, |m| m.topic == "outpost/tooled/events");

    client.publish("outpost/tooled/cmd/capture-now", "");
    let call = client.wait_for("a tool call", WAIT, |m| m.topic == "outpost/tooled/tool/dispatch_rescue_team").json();
    let call_id = call["id"].as_str().unwrap().to_owned();
    let results = "outpost/tooled/tool/dispatch_rescue_team/result";
    let replies = "outpost/tooled/tool/dispatch_rescue_team/result/reply";

    let refusals = [
        ("{broken".to_string(), "not a valid tool result"),
        (r#"{"id":5,"result":{}}"#.to_string(), "invalid type"),
        (format!(r#"{{"id":"{call_id}","result":"done"}}"#), "expected a map"),
        (format!(r#"{{"id":"{call_id}","result":{{"x":"{}"}}}}"#, "a".repeat(100_000)), "over the limit"),
        (r#"{"id":"01a21ca2-c5de-70f3-a878-cb8364503513","result":{}}"#.to_string(), "no call 01a21ca2"),
    ];
    for (payload, expected) in refusals {
        client.publish(results, payload.clone());
        let reply = client.wait_for("a refusal", WAIT, |m| m.topic == replies).json();
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(reply["message"].as_str().unwrap().contains(expected), "{expected}: {reply}");
    }

    client.publish(results, format!(r#"{{"id":"{call_id}","result":{{"team":"alpha","eta_minutes":12}}}}"#));
    let report = client
        .wait_for("the report after the result", WAIT, |m| {
            m.topic == "outpost/tooled/report" && m.json()["trigger"]["kind"] == "tool_result"
        })
        .json();
    assert_eq!(report["trigger"]["event_id"], call_id.as_str(), "{report}");
    let reply = client.wait_for("the result's reply", WAIT, |m| m.topic == replies).json();
    assert_eq!((reply["ok"].as_bool(), reply["id"].as_str()), (Some(true), Some(call_id.as_str())), "{reply}");

    // A result is taken once.
    client.publish(results, format!(r#"{{"id":"{call_id}","result":{{}}}}"#));
    let reply = client.wait_for("a refusal of the repeat", WAIT, |m| m.topic == replies).json();
    assert!(reply["message"].as_str().unwrap().contains("is waiting for a result"), "{reply}");
}

#[test]
fn thumbnails_when_asked_for_are_small_jpegs_of_the_reported_frame() {
    use base64::Engine;

    let broker = Mosquitto::start();
    let mut client = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let config = station_config(dir.path(), "pictured", broker.port);
    let text = std::fs::read_to_string(&config).unwrap().replace("triggers = [\"motion\"]", "triggers = []")
        + "\n[thumbnails]\nenabled = true\nwidth = 160\n";
    std::fs::write(&config, text).unwrap();
    let _daemon = Daemon::run_config(&config);
    client.wait_for("a first event", WAIT, |m| m.topic == "outpost/pictured/events");
    client.publish("outpost/pictured/cmd/capture-now", "");
    let thumbnail = client.wait_for("a thumbnail", WAIT, |m| m.topic == "outpost/pictured/thumbnail");
    let jpeg = base64::engine::general_purpose::STANDARD.decode(thumbnail.payload.trim()).unwrap();
    let picture = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
    // The sample clip is 320x240.
    assert_eq!((picture.width(), picture.height()), (160, 120));
}

#[test]
fn over_mqtt5_reports_carry_their_schema_version_and_tool_calls_are_answered_by_correlation() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{Client, Event, MqttOptions};

    let broker = Mosquitto::start();
    let mut options = MqttOptions::new("test-mqtt5-dashboard", "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = Client::new(options, 16);
    client.subscribe("outpost/m5/#", QoS::AtLeastOnce).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for notification in connection.iter() {
            match notification {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    if tx.send((topic, p.payload.to_vec(), p.properties)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    let wait_for = |topic: &str| {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (got, payload, properties) =
                rx.recv_timeout(left).unwrap_or_else(|_| panic!("nothing on {topic} within {WAIT:?}"));
            if got == topic {
                return (payload, properties.unwrap_or_default());
            }
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let config = station_config(dir.path(), "m5", broker.port);
    let text = std::fs::read_to_string(&config).unwrap().replace("triggers = [\"motion\"]", "triggers = []");
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::run_config(&config);
    daemon.wait_for_log("(MQTT 5)", WAIT);
    client.publish("outpost/m5/cmd/capture-now", QoS::AtLeastOnce, false, "").unwrap();

    let (_, properties) = wait_for("outpost/m5/report");
    assert!(properties.user_properties.contains(&("schema_version".into(), "1".into())), "{properties:?}");
    assert!(properties.message_expiry_interval.is_some_and(|s| s > 86_000), "{properties:?}");

    // The call says where to answer and how to name it, as MQTT 5 request/response does.
    let (call, properties) = wait_for("outpost/m5/tool/dispatch_rescue_team");
    let call: Value = serde_json::from_slice(&call).unwrap();
    let call_id = call["id"].as_str().unwrap().to_owned();
    let results = "outpost/m5/tool/dispatch_rescue_team/result";
    assert_eq!(properties.response_topic.as_deref(), Some(results), "{properties:?}");
    assert_eq!(properties.correlation_data.as_deref(), Some(call_id.as_bytes()), "{properties:?}");

    // An answer that names its call by that correlation data alone continues the conversation.
    let answer = PublishProperties { correlation_data: properties.correlation_data, ..PublishProperties::default() };
    client.publish_with_properties(results, QoS::AtLeastOnce, false, r#"{"result":{"team":"alpha"}}"#, answer).unwrap();
    let (report, _) = wait_for("outpost/m5/report");
    let report: Value = serde_json::from_slice(&report).unwrap();
    assert_eq!(report["trigger"]["kind"], "tool_result", "{report}");
    assert_eq!(report["trigger"]["event_id"], call_id.as_str(), "{report}");
    let (reply, _) = wait_for("outpost/m5/tool/dispatch_rescue_team/result/reply");
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!((reply["ok"].as_bool(), reply["id"].as_str()), (Some(true), Some(call_id.as_str())), "{reply}");
}

#[test]
fn killed_mid_burst_of_alerts_in_an_outage_the_restarted_daemon_delivers_every_stored_alert_in_order() {
    let mut broker = Mosquitto::start();
    let mut subscriber = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let config = station_config(dir.path(), "alarmed", broker.port);
    // Every look raises an alert, as fast as the model can look: a burst.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("cooldown_secs = 2", "cooldown_secs = 0\nimage_tokens = 70")
        .replace("rearm_secs = 3600", "rearm_secs = 0")
        .replace("tool_min_severity = 0", "tool_min_severity = 3")
        + "\n[outbox]\ndir = \"outbox\"\n";
    std::fs::write(&config, text).unwrap();
    let alerts = "outpost/alarmed/alert";

    let mut first = Daemon::run_config(&config);
    subscriber.wait_for("a first alert", WAIT, |m| m.topic == alerts);
    broker.stop();
    first.wait_for_log("lost connection to MQTT broker", WAIT);
    let outage_log_start = first.stderr().len();
    // The alerts go on into the outbox while the broker is away; then the power goes.
    first.wait_for_log_where("two alerts stored in the outage", 2 * WAIT, |log| {
        stored_ids(&log[outage_log_start..], "alert").len() >= 2
    });
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait(WAIT);
    let log = first.stderr();
    let stored = stored_ids(&log, "alert");
    let stored_in_outage = stored_ids(&log[outage_log_start..], "alert");

    broker.restart();
    let restarted_at = std::time::SystemTime::now();
    let second = Daemon::run_config(&config);
    let (delivered, first_seen) = wait_for_ids(&mut subscriber, alerts, &stored, WAIT);
    second.wait_for_log("messages from an earlier run to deliver first", WAIT);
    for message in &delivered {
        let alert = message.json();
        // Raised while the broker was down, so it can only have come from the outbox, after the restart.
        if stored_in_outage.iter().any(|id| alert["id"] == id.as_str()) {
            assert!(message.received_at > restarted_at, "{}", message.payload);
            assert_eq!(alert["historical"], true, "left by the killed daemon: {}", message.payload);
        }
    }
    assert_eq!(first_seen, stored, "every stored alert, once each at least, in the order it was raised");
    eprintln!(
        "{} alerts stored by the killed daemon, {} in the outage; {} deliveries of them",
        stored.len(),
        stored_in_outage.len(),
        delivered.iter().filter(|m| stored.iter().any(|id| m.payload.contains(id.as_str()))).count()
    );
}
