//! The daemon against a real mosquitto: replayed media in, events out, through outages, signals
//! and reloads.

mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, SystemTime};

use common::{stored_ids, wait_for_ids, write_config, Daemon, Mosquitto, Subscriber, CLIP_CAMERA, FAST_MOTION_GATE};
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn replayed_clip_gives_motion_events_then_the_daemon_stops_cleanly() {
    let broker = Mosquitto::start();
    let mut subscriber = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "clip", broker.port, &format!("{CLIP_CAMERA}{FAST_MOTION_GATE}"));

    let mut daemon = Daemon::run_config(&config);
    subscriber.wait_for_payload("outpost/clip/status", "online", WAIT);
    // 60 frames at 20 fps: the clip ends after 3 s and the daemon stops by itself.
    let status = daemon.wait(WAIT);
    assert!(status.success(), "{status}; log:\n{}", daemon.stderr());
    subscriber.wait_for_payload("outpost/clip/status", "stopped", WAIT);

    let events: Vec<_> = subscriber.received().iter().filter(|m| m.topic == "outpost/clip/events").cloned().collect();
    // People walk through the whole clip; a 0.3 s cool-down allows one event every 6 frames.
    assert!(events.len() >= 4, "only {} events:\n{}", events.len(), subscriber.transcript());
    let mut last_seq = None;
    for message in &events {
        let event = message.json();
        assert_eq!(event["type"], "motion");
        assert_eq!(event["station"], "clip");
        assert_eq!((event["frame_width"].as_u64(), event["frame_height"].as_u64()), (Some(320), Some(240)));
        let fraction = event["changed_fraction"].as_f64().unwrap();
        assert!((0.005..1.0).contains(&fraction), "{fraction}");
        let region = &event["region"];
        assert!(region["x"].as_u64().unwrap() + region["width"].as_u64().unwrap() <= 320);
        assert!(region["y"].as_u64().unwrap() + region["height"].as_u64().unwrap() <= 240);
        let seq = event["frame_seq"].as_u64().unwrap();
        assert!(seq < 60 && last_seq.is_none_or(|last| seq > last), "frames in order: {seq} after {last_seq:?}");
        last_seq = Some(seq);
        let at = humantime::parse_rfc3339(event["timestamp"].as_str().unwrap()).unwrap();
        assert!(at <= SystemTime::now());
    }
    let log = daemon.stderr();
    assert!(log.contains("every source has ended: stopping"), "{log}");
    assert!(log.contains(&format!("{} events delivered, 0 undelivered", events.len())), "{log}");
}

#[test]
fn killed_daemon_leaves_its_last_will() {
    let broker = Mosquitto::start();
    let mut subscriber = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "will", broker.port, &format!("{CLIP_CAMERA}loop = true\n"));

    let daemon = Daemon::run_config(&config);
    subscriber.wait_for_payload("outpost/will/status", "online", WAIT);
    daemon.signal(Signal::SIGKILL);
    let will = subscriber.wait_for_payload("outpost/will/status", "offline", WAIT);
    assert!(!will.retained, "delivered live, so not flagged retained");
    // And it is retained: a dashboard that connects later sees it.
    let mut late = Subscriber::connect(broker.port, "outpost/will/status");
    let seen = late.wait_for_payload("outpost/will/status", "offline", WAIT);
    assert!(seen.retained);
}

#[test]
fn broker_restart_loses_no_event() {
    let mut broker = Mosquitto::start();
    let mut subscriber = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let config =
        write_config(dir.path(), "outage", broker.port, &format!("{CLIP_CAMERA}loop = true\n{FAST_MOTION_GATE}"));

    let daemon = Daemon::run_config(&config);
    subscriber.wait_for_payload("outpost/outage/status", "online", WAIT);
    subscriber.wait_for("a first event", WAIT, |m| m.topic == "outpost/outage/events");

    broker.stop();
    let outage_start = SystemTime::now();
    daemon.wait_for_log("lost connection to MQTT broker", WAIT);
    std::thread::sleep(Duration::from_secs(2));
    let outage_end = SystemTime::now();
    broker.restart();

    subscriber.wait_for_payload("outpost/outage/status", "online", WAIT);
    // Events captured while the broker was down arrive after it comes back.
    let held = subscriber.wait_for("an event captured during the outage", WAIT, |m| {
        if m.topic != "outpost/outage/events" {
            return false;
        }
        let at = humantime::parse_rfc3339(m.json()["timestamp"].as_str().unwrap()).unwrap();
        outage_start < at && at < outage_end
    });
    assert!(held.received_at > outage_end);
    assert_eq!(held.json()["historical"], true, "held through the outage: {}", held.payload);
    // And the daemon carries on publishing new ones.
    let after = SystemTime::now();
    subscriber.wait_for("an event after the outage", WAIT, |m| {
        m.topic == "outpost/outage/events"
            && humantime::parse_rfc3339(m.json()["timestamp"].as_str().unwrap()).unwrap() > after
    });
    let log = daemon.stderr();
    assert!(log.contains("reconnecting in"), "{log}");
    assert_eq!(log.matches("connected to MQTT broker at").count(), 2, "{log}");
}

#[test]
fn sighup_applies_a_good_config_keeps_the_old_after_a_bad_one_and_sigterm_stops() {
    let broker = Mosquitto::start();
    let mut subscriber = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let station_config = format!("{CLIP_CAMERA}loop = true\n{FAST_MOTION_GATE}");
    let config = write_config(dir.path(), "first", broker.port, &station_config);

    let mut daemon = Daemon::run_config(&config);
    subscriber.wait_for_payload("outpost/first/status", "online", WAIT);
    subscriber.wait_for("an event from the first station", WAIT, |m| m.topic == "outpost/first/events");

    // A broken file: reported, and the daemon goes on as it was.
    std::fs::write(&config, "[station]\nid = \"first\"\n[camera]\nsource = \"mjpeg\"\nfps = -1\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("the config file is not valid; the one in force stays", WAIT);
    let log = daemon.stderr();
    assert!(log.contains("camera.path: is required for `source = \"mjpeg\"`"), "{log}");
    let after_bad_reload = SystemTime::now();
    subscriber.wait_for("an event after the bad reload", WAIT, |m| {
        m.topic == "outpost/first/events" && m.received_at > after_bad_reload
    });

    // A good one with a new station id: the old station says `stopped`, the new one comes online.
    let renamed = write_config(dir.path(), "second", broker.port, &station_config);
    std::fs::rename(&renamed, &config).unwrap();
    daemon.signal(Signal::SIGHUP);
    subscriber.wait_for_payload("outpost/first/status", "stopped", WAIT);
    subscriber.wait_for_payload("outpost/second/status", "online", WAIT);
    subscriber.wait_for("an event from the renamed station", WAIT, |m| m.topic == "outpost/second/events");

    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait(WAIT);
    assert!(status.success(), "{status}; log:\n{}", daemon.stderr());
    subscriber.wait_for_payload("outpost/second/status", "stopped", WAIT);
    assert!(daemon.stderr().contains("SIGTERM: stopping"));
}

#[test]
fn daemon_keeps_trying_when_no_broker_is_there() {
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "lonely", port, &format!("{CLIP_CAMERA}loop = true\n{FAST_MOTION_GATE}"));
    let daemon = Daemon::run_config(&config);
    daemon.wait_for_log(&format!("cannot connect to MQTT broker at 127.0.0.1:{port}"), WAIT);
    // The broker appears later: what was captured meanwhile is delivered.
    let broker = Mosquitto::start_on(port);
    let mut subscriber = Subscriber::connect(broker.port, "outpost/#");
    subscriber.wait_for_payload("outpost/lonely/status", "online", WAIT);
    subscriber.wait_for("a held event", WAIT, |m| m.topic == "outpost/lonely/events");
}

#[test]
fn killed_mid_burst_in_an_outage_the_restarted_daemon_delivers_every_stored_event_in_order() {
    let mut broker = Mosquitto::start();
    let mut subscriber = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{CLIP_CAMERA}loop = true\n[gates.motion]\ncooldown_secs = 0.1\n[outbox]\ndir = \"outbox\"\n");
    let config = write_config(dir.path(), "burst", broker.port, &extra);

    let mut first = Daemon::run_config(&config);
    subscriber.wait_for("a first event", WAIT, |m| m.topic == "outpost/burst/events");
    broker.stop();
    let outage_start = SystemTime::now();
    first.wait_for_log("lost connection to MQTT broker", WAIT);
    // The burst goes on into the outbox while the broker is away; then the power goes.
    std::thread::sleep(Duration::from_secs(2));
    first.signal(Signal::SIGKILL);
    first.wait(WAIT);
    let stored = stored_ids(&first.stderr(), "event");
    assert!(stored.len() >= 10, "only {} events stored:\n{}", stored.len(), first.stderr());

    broker.restart();
    let restarted_at = SystemTime::now();
    let second = Daemon::run_config(&config);
    // Those delivered before the outage are already there; the rest come from the outbox.
    let (events, first_seen) = wait_for_ids(&mut subscriber, "outpost/burst/events", &stored, WAIT);
    second.wait_for_log("messages from an earlier run to deliver first", WAIT);
    for message in &events {
        let json = message.json();
        let id = json["id"].as_str().unwrap();
        let at = humantime::parse_rfc3339(json["timestamp"].as_str().unwrap()).unwrap();
        // Captured in the outage, so it can only have come from the outbox, through the restart.
        if at > outage_start && stored.iter().any(|s| s == id) {
            assert!(message.received_at > restarted_at);
            assert_eq!(json["historical"], true, "left by the killed daemon: {}", message.payload);
        }
    }
    assert_eq!(first_seen, stored, "every stored event, once each at least, in the order it happened");
    let copies = events.iter().filter(|m| stored.iter().any(|id| m.payload.contains(id.as_str()))).count();
    eprintln!(
        "{} events stored by the killed daemon, {} deliveries ({} sent again)",
        stored.len(),
        copies,
        copies - stored.len()
    );
}

#[test]
fn a_second_daemon_cannot_share_an_outbox() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{CLIP_CAMERA}loop = true\n[outbox]\ndir = \"shared-outbox\"\n");
    let first_config = write_config(dir.path(), "one", broker.port, &extra);
    let second_config = write_config(dir.path(), "two", broker.port, &extra);
    let first = Daemon::run_config(&first_config);
    first.wait_for_log("connected to MQTT broker", WAIT);
    let mut second = Daemon::run_config(&second_config);
    let status = second.wait(WAIT);
    assert!(!status.success());
    let log = second.stderr();
    assert!(log.contains("shared-outbox is in use by another outpostd"), "{log}");
}

#[test]
fn sigterm_stops_promptly_while_the_broker_is_down_and_the_queue_is_full() {
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{CLIP_CAMERA}loop = true\n[gates.motion]\ncooldown_secs = 0\n[queues]\nevents = 2\n");
    let config = write_config(dir.path(), "stranded", port, &extra);
    let mut daemon = Daemon::run_config(&config);
    daemon.wait_for_log("cannot connect to MQTT broker", WAIT);
    // With no cool-down every frame of the walking people is an event: the queue of 2 fills.
    std::thread::sleep(Duration::from_secs(1));
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait(Duration::from_secs(15));
    assert!(status.success(), "{status}; log:\n{}", daemon.stderr());
    let log = daemon.stderr();
    assert!(log.contains("events were not acknowledged by the broker at 127.0.0.1"), "{log}");
    assert!(log.contains("messages for the next start"), "{log}");
}

#[test]
fn commands_pause_and_resume_capture_and_malformed_ones_change_nothing() {
    let broker = Mosquitto::start();
    let mut client = Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{CLIP_CAMERA}loop = true\n{FAST_MOTION_GATE}[stats]\ninterval_secs = 0.5\n");
    let config = write_config(dir.path(), "cmd", broker.port, &extra);
    let daemon = Daemon::run_config(&config);
    client.wait_for("a first event", WAIT, |m| m.topic == "outpost/cmd/events");
    let stats = client.wait_for("figures", WAIT, |m| m.topic == "outpost/cmd/stats");
    let figures = stats.json();
    assert_eq!(figures["paused"], false, "{figures}");
    assert_eq!(figures["publisher"]["connected"], true, "{figures}");
    assert!(figures["capture"]["frames"].as_u64().unwrap() > 0, "{figures}");

    // Malformed, unknown and oversized commands get a reason and change nothing.
    client.publish("outpost/cmd/cmd/pause", r#"{"id":"p0","force":tru"#);
    let reply = client.wait_for("a refusal", WAIT, |m| m.topic == "outpost/cmd/cmd/pause/reply").json();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("not a valid pause request"), "{reply}");
    client.publish("outpost/cmd/cmd/selfdestruct", "{}");
    let reply = client.wait_for("a refusal", WAIT, |m| m.topic == "outpost/cmd/cmd/unknown/reply").json();
    assert!(reply["message"].as_str().unwrap().contains("unknown command `selfdestruct`"), "{reply}");
    client.publish("outpost/cmd/cmd/ask", vec![b'x'; 100_000]);
    let reply = client.wait_for("a refusal", WAIT, |m| m.topic == "outpost/cmd/cmd/ask/reply").json();
    assert!(reply["message"].as_str().unwrap().contains("over the limit"), "{reply}");
    let after_refusals = SystemTime::now();
    client.wait_for("an event after the refusals", WAIT, |m| {
        m.topic == "outpost/cmd/events" && m.received_at > after_refusals
    });

    client.publish("outpost/cmd/cmd/pause", r#"{"id":"p1"}"#);
    let reply = client.wait_for("the pause reply", WAIT, |m| m.topic == "outpost/cmd/cmd/pause/reply").json();
    assert_eq!((reply["ok"].as_bool(), reply["id"].as_str()), (Some(true), Some("p1")), "{reply}");
    let paused_at = SystemTime::now();
    let stats =
        client.wait_for("figures while paused", WAIT, |m| m.topic == "outpost/cmd/stats" && m.received_at > paused_at);
    assert_eq!(stats.json()["paused"], true, "{}", stats.payload);
    std::thread::sleep(Duration::from_secs(1));
    let late: Vec<_> = client
        .received()
        .iter()
        .filter(|m| m.topic == "outpost/cmd/events" && m.received_at > paused_at + Duration::from_millis(300))
        .cloned()
        .collect();
    assert!(late.is_empty(), "events while paused: {late:?}");

    client.publish("outpost/cmd/cmd/resume", "");
    let reply = client.wait_for("the resume reply", WAIT, |m| m.topic == "outpost/cmd/cmd/resume/reply").json();
    assert_eq!(reply["ok"], true, "{reply}");
    let resumed_at = SystemTime::now();
    client.wait_for("an event after resuming", WAIT, |m| m.topic == "outpost/cmd/events" && m.received_at > resumed_at);
    let log = daemon.stderr();
    assert!(log.contains("capture paused by command") && log.contains("capture resumed by command"), "{log}");
}

#[test]
fn demo_runs_with_its_own_broker_shows_a_report_an_alert_and_a_tool_call_and_stops_on_ctrl_c() {
    let mut daemon = Daemon::start(&["demo"]);
    let stdout = BufReader::new(daemon.stdout());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    // An event, and the tiny model's report, the alert it raises and its tool call.
    let wanted = [
        "outpost/demo/events {",
        "outpost/demo/report {",
        "outpost/demo/alert {",
        "outpost/demo/tool/dispatch_rescue_team {",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !wanted.iter().all(|w| lines.iter().any(|l: &String| l.starts_with(w))) {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(line) => lines.push(line),
            Err(_) => panic!(
                "the demo did not publish all of {wanted:?}; stdout:\n{}\nlog:\n{}",
                lines.join("\n"),
                daemon.stderr()
            ),
        }
    }
    assert_eq!(lines[0], "outpost/demo/status online");
    daemon.signal(Signal::SIGINT);
    let status = daemon.wait(WAIT);
    assert!(status.success(), "{status}; log:\n{}", daemon.stderr());
    lines.extend(rx.iter());
    assert_eq!(lines.last().map(String::as_str), Some("outpost/demo/status stopped"), "{}", lines.join("\n"));
    assert!(daemon.stderr().contains("embedded MQTT broker on 127.0.0.1:"));
    // The embedded broker speaks 3.1.1 only: the daemon falls back to it.
    assert!(daemon.stderr().contains("(MQTT 3.1.1)"), "{}", daemon.stderr());
}
