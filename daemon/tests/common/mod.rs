//! Real parts for the end-to-end tests: a mosquitto broker on a free loopback port, an MQTT
//! subscriber, and the `outpostd` binary itself.
#![allow(dead_code)] // each test file uses its own part of this

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod binary;
pub use binary::outpostd;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    listener.local_addr().unwrap().port()
}

/// A mosquitto process on 127.0.0.1, killed on drop. Persistence is on, in its own directory, so
/// that a subscriber's session and queued messages survive a restart of the broker.
pub struct Mosquitto {
    pub port: u16,
    /// A second, plain listener for the test's own clients, when the first one asks for more.
    pub plain_port: Option<u16>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Lines before the listeners: authentication, ACL.
    global: String,
    /// Lines of the first listener: TLS.
    listener: String,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        Self::start_configured(port, |_| ("allow_anonymous true".into(), String::new(), false))
    }

    /// A broker that admits only `user` with `password`.
    pub fn start_with_password(user: &str, password: &str) -> Self {
        Self::start_with_users(&[(user, password)], None)
    }

    /// A broker that admits only these users, with an ACL (mosquitto's `acl_file` syntax) if given.
    pub fn start_with_users(users: &[(&str, &str)], acl: Option<&str>) -> Self {
        Self::start_configured(free_port(), |dir| {
            let passwords = dir.join("passwords");
            std::fs::write(&passwords, "").unwrap();
            for (user, password) in users {
                let status = Command::new("mosquitto_passwd")
                    .arg("-b")
                    .arg(&passwords)
                    .args([user, password])
                    .status()
                    .expect("mosquitto_passwd (Debian package `mosquitto`)");
                assert!(status.success());
            }
            let mut global = format!("allow_anonymous false\npassword_file {}\n", passwords.display());
            if let Some(acl) = acl {
                let acl_file = dir.join("acl");
                std::fs::write(&acl_file, acl).unwrap();
                global.push_str(&format!("acl_file {}\n", acl_file.display()));
            }
            (global, String::new(), false)
        })
    }

    /// A broker whose config `settings` writes, given its directory: the global lines, the first
    /// listener's lines, and whether to add a plain listener for the test's own clients.
    pub fn start_configured(port: u16, settings: impl FnOnce(&Path) -> (String, String, bool)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (global, listener, plain) = settings(dir.path());
        let plain_port = plain.then(free_port);
        let mut broker = Self { port, plain_port, dir, child: None, global, listener };
        broker.launch();
        broker
    }

    fn launch(&mut self) {
        let config = self.dir.path().join("mosquitto.conf");
        let mut file = std::fs::File::create(&config).unwrap();
        // Started as root, mosquitto would switch to its own user and lose access to the tempdir.
        writeln!(
            file,
            "{}\npersistence true\npersistence_location {}/\nuser root\nlog_dest stderr\nlistener {} 127.0.0.1\n{}",
            self.global,
            self.dir.path().display(),
            self.port,
            self.listener
        )
        .unwrap();
        if let Some(plain) = self.plain_port {
            writeln!(file, "listener {plain} 127.0.0.1").unwrap();
        }
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto is not installed: run deploy/dev-setup.sh (Debian package `mosquitto`)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on port {}: {}", self.port, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker the way an operator would (it saves its persistence file).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: String,
    pub retained: bool,
    pub received_at: std::time::SystemTime,
}

impl Message {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {}", self.topic, self.payload))
    }
}

/// An MQTT client subscribed to `outpost/#` (QoS 1, persistent session), collecting everything.
pub struct Subscriber {
    messages: mpsc::Receiver<Message>,
    seen: Vec<Message>,
    client: Client,
}

impl Subscriber {
    pub fn connect(port: u16, filter: &str) -> Self {
        Self::connect_as(port, filter, None)
    }

    pub fn connect_as(port: u16, filter: &str, credentials: Option<(&str, &str)>) -> Self {
        // Each subscriber its own id: a broker drops a client when another connects with its id.
        static SUBSCRIBERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SUBSCRIBERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut options = MqttOptions::new(format!("test-subscriber-{port}-{n}"), "127.0.0.1", port);
        // Large enough for the oversized commands the tests send.
        options.set_clean_session(false).set_keep_alive(Duration::from_secs(5)).set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, mut connection) = Client::new(options, 16);
        let (tx, messages) = mpsc::channel();
        let resubscribe = client.clone();
        let filter = filter.to_owned();
        std::thread::spawn(move || {
            for notification in connection.iter() {
                match notification {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = resubscribe.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let message = Message {
                            topic: p.topic.clone(),
                            payload: String::from_utf8_lossy(&p.payload).into_owned(),
                            retained: p.retain,
                            received_at: std::time::SystemTime::now(),
                        };
                        if tx.send(message).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // The broker is down: the iterator reconnects on the next call.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        Self { messages, seen: Vec::new(), client }
    }

    /// Waits for a message that satisfies `wanted`, that was not returned before.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, wanted: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(message) => {
                    self.seen.push(message.clone());
                    if wanted(&message) {
                        return message;
                    }
                }
                Err(_) => panic!("no {what} within {timeout:?}; received:\n{}", self.transcript()),
            }
        }
    }

    pub fn wait_for_payload(&mut self, topic: &str, payload: &str, timeout: Duration) -> Message {
        self.wait_for(&format!("`{payload}` on {topic}"), timeout, |m| m.topic == topic && m.payload == payload)
    }

    /// Everything received so far, including what is waiting now.
    pub fn received(&mut self) -> &[Message] {
        while let Ok(message) = self.messages.try_recv() {
            self.seen.push(message);
        }
        &self.seen
    }

    /// Publishes with QoS 1, as a dashboard sending a command would.
    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).unwrap();
    }

    pub fn transcript(&self) -> String {
        self.seen.iter().map(|m| format!("  {} {}\n", m.topic, m.payload)).collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// An `outpostd` process, killed on drop; its stderr goes to a file for the failure messages.
pub struct Daemon {
    child: Child,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let child = outpostd()
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,outpost=debug")
            // Each daemon its own outbox, unless its config names one.
            .env("XDG_STATE_HOME", dir.path())
            .env_remove("STATE_DIRECTORY")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start outpostd");
        Self { child, stderr_path, _dir: dir }
    }

    pub fn run_config(config: &Path) -> Self {
        Self::start(&["run", "--config", config.to_str().unwrap()])
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "outpostd still running after {timeout:?}; its log:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        self.wait_for_log_where(&format!("`{text}`"), timeout, |log| log.contains(text));
    }

    /// Waits until `wanted` holds for the whole log so far.
    pub fn wait_for_log_where(&self, what: &str, timeout: Duration, wanted: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while !wanted(&self.stderr()) {
            assert!(Instant::now() < deadline, "outpostd never logged {what}; its log:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stdout(&mut self) -> std::process::ChildStdout {
        self.child.stdout.take().expect("stdout taken once")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test that failed waiting on MQTT finds why only in the daemon's log; its debug lines
        // (an event per motion) would bury the rest.
        if std::thread::panicking() {
            let log = self.stderr();
            let lines: Vec<&str> = log.lines().filter(|line| !line.contains(" DEBUG ")).collect();
            let tail = &lines[lines.len().saturating_sub(100)..];
            eprintln!("outpostd's log, its last {} lines above DEBUG:", tail.len());
            for line in tail {
                eprintln!("  {line}");
            }
        }
    }
}

/// The ids of the messages of one kind (`event`, `alert`) that the daemon logged as written to its
/// outbox, in order.
pub fn stored_ids(log: &str, kind: &str) -> Vec<String> {
    let suffix = format!(" {kind}");
    log.lines()
        .filter_map(|line| line.split_once(" stored in the outbox as message "))
        .filter_map(|(label, _)| label.rsplit_once(' '))
        .filter(|(head, _)| head.ends_with(&suffix))
        .map(|(_, id)| id.to_owned())
        .collect()
}

/// Waits until each of `ids` has arrived on `topic` (as a message's `"id"`), counting those already
/// received. Returns every message on `topic` so far, and the ids in the order each first arrived.
pub fn wait_for_ids(
    subscriber: &mut Subscriber,
    topic: &str,
    ids: &[String],
    timeout: Duration,
) -> (Vec<Message>, Vec<String>) {
    let id_of = |m: &Message| m.json()["id"].as_str().map(str::to_owned);
    let missing = std::cell::RefCell::new(ids.iter().cloned().collect::<std::collections::HashSet<_>>());
    let arrived = |m: &Message| {
        if let Some(id) = (m.topic == topic).then(|| id_of(m)).flatten() {
            missing.borrow_mut().remove(&id);
        }
        missing.borrow().is_empty()
    };
    for message in subscriber.received() {
        arrived(message);
    }
    if !missing.borrow().is_empty() {
        subscriber.wait_for(&format!("every one of {} ids on {topic}", ids.len()), timeout, arrived);
    }
    let delivered: Vec<Message> = subscriber.received().iter().filter(|m| m.topic == topic).cloned().collect();
    let mut first_seen: Vec<String> = Vec::new();
    for id in delivered.iter().filter_map(id_of) {
        if ids.contains(&id) && !first_seen.contains(&id) {
            first_seen.push(id);
        }
    }
    (delivered, first_seen)
}

/// Writes a station config for a broker on `port`, with the given extra TOML, into `dir`.
pub fn write_config(dir: &Path, station: &str, port: u16, extra: &str) -> PathBuf {
    let path = dir.join(format!("{station}.toml"));
    let text = format!(
        "[station]\nid = \"{station}\"\n\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nkeep_alive_secs = 5\nreconnect_min_secs = 0.2\nreconnect_max_secs = 1\n\n{extra}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

pub const CLIP_CAMERA: &str = "[camera]\nsource = \"mjpeg\"\npath = \"builtin:people.mjpeg\"\nfps = 20\n";
pub const FAST_MOTION_GATE: &str = "[gates.motion]\ncooldown_secs = 0.3\n";

/// A library of this workspace that the tests load into a process (the camera emulator, the
/// ALSA plugin). Test programs are in `$CARGO_TARGET_DIR/<profile>/deps/`; `cargo test
/// --workspace` builds the library there, `cargo build` copies it one level up. The copy in
/// `deps/` comes first: `cargo test` does not refresh the other.
pub fn workspace_library(file: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [deps.join(file), deps.parent().unwrap().join(file)];
    candidates.iter().find(|path| path.is_file()).cloned().unwrap_or_else(|| {
        panic!("{file} is not built: run `cargo build -p {package}` (test.sh builds the whole workspace)")
    })
}

/// Waits until a device's status matches, failing with every state seen meanwhile.
pub fn wait_for_status(
    receiver: &mut tokio::sync::watch::Receiver<Option<outpost::capture::DeviceStatus>>,
    timeout: Duration,
    wanted: impl Fn(&outpost::capture::DeviceStatus) -> bool,
) -> outpost::capture::DeviceStatus {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        if let Some(status) = receiver.borrow_and_update().clone() {
            if wanted(&status) {
                return status;
            }
            if seen.last() != Some(&status) {
                seen.push(status);
            }
        }
        assert!(Instant::now() < deadline, "no such status within {timeout:?}; seen: {seen:#?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// On a thread of its own, waits (10 s at most) for a device to be reported offline, then runs
/// `recover` (plugs it back in, ends a stall): the source under test blocks meanwhile, retrying.
/// Joined, it gives the offline report.
pub fn recover_when_offline(
    receiver: &tokio::sync::watch::Receiver<Option<outpost::capture::DeviceStatus>>,
    recover: impl FnOnce() + Send + 'static,
) -> std::thread::JoinHandle<outpost::capture::DeviceStatus> {
    let mut receiver = receiver.clone();
    std::thread::spawn(move || {
        let offline = wait_for_status(&mut receiver, Duration::from_secs(10), |s| {
            s.state == outpost::capture::DeviceState::Offline
        });
        recover();
        offline
    })
}
