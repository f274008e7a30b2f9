//! The MQTT sink: events out as JSON, the station's availability on a retained status topic, and
//! the camera's and microphone's state on retained topics of their own.
//!
//! Delivery is at least once. Every message stays in `unacked` until the broker's PUBACK; when a
//! connection drops, all of them are sent again on the next one, in their original order. Each
//! connection gets a fresh rumqttc client and event loop, so nothing a dead connection had
//! buffered can be sent twice behind our back or lost in rumqttc's own clean-session reset.
//!
//! Events are also written to the on-disk [`Outbox`] before they are queued, and removed from it
//! on their PUBACK: what a killed daemon or a power cut left unacknowledged is published first on
//! the next start. A message that reaches the broker late (held through an outage, left from an
//! earlier run, or older than `HISTORICAL_AFTER`) carries `"historical": true`; its own timestamp
//! says when it happened.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::{v5, AsyncClient, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn, Instrument};

use crate::analysis::Publication;
use crate::capture::{DeviceReporters, DeviceStatus, StatusReporter};
use crate::command::{self, CommandReply, Inbound, ToolResult};
use crate::config::Config;
use crate::event::Event;
use crate::home_assistant;
use crate::outbox::{Outbox, OutboxError, Priority, StoredMessage, PRIORITY_EVENT};
use crate::report::SceneReport;
use crate::supervision::Heartbeat;
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("mqtt.tls: {0}")]
    Tls(#[from] TlsError),
}

/// Payloads of `<prefix>/<station>/status`, as Frigate and Home Assistant use them.
pub const STATUS_ONLINE: &str = "online";
pub const STATUS_OFFLINE: &str = "offline";
pub const STATUS_STOPPED: &str = "stopped";

/// How long a clean stop waits for the broker to acknowledge what is still queued.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages handed to rumqttc and not yet acknowledged; below rumqttc's in-flight window, so it
/// never holds one back and the order of `Outgoing::Publish` notices is the order of hand-over.
const MAX_IN_FLIGHT: usize = 64;
const RUMQTTC_IN_FLIGHT: u16 = 100;
/// The publisher's loop wakes at least this often, to show it is not stuck.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A message handed to the broker this long after it was made is flagged as historical.
const HISTORICAL_AFTER: Duration = Duration::from_secs(10);
/// Incoming messages past this size end the connection (rumqttc refuses them unread); below it,
/// a command too large for its kind gets an error reply.
const MAX_INCOMING_BYTES: usize = 256 << 10;
const MAX_OUTGOING_BYTES: usize = 1 << 20;
/// Commands waiting for the service; more are refused as busy.
const COMMAND_QUEUE: usize = 8;

/// Topics of one station.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// `<prefix>/<station>`.
    pub root: String,
    pub status: String,
    pub events: String,
    pub camera_status: String,
    pub microphone_status: String,
    pub stats: String,
    /// `<root>/cmd/`: commands arrive on `<commands><name>`, replies go to `<commands><name>/reply`.
    pub commands: String,
}

impl Topics {
    pub fn new(config: &Config) -> Self {
        let root = config.topic_root();
        Self {
            root: root.clone(),
            status: format!("{root}/status"),
            events: format!("{root}/events"),
            camera_status: format!("{root}/camera/status"),
            microphone_status: format!("{root}/microphone/status"),
            stats: format!("{root}/stats"),
            commands: format!("{root}/cmd/"),
        }
    }
}

/// What the publisher did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherReport {
    /// Events the broker acknowledged.
    pub events_delivered: u64,
    /// Events still unacknowledged when the stop's flush time ran out.
    pub events_undelivered: usize,
    /// Messages left in the outbox for the next start.
    pub outbox_held: usize,
    /// For each report of this run the broker acknowledged (the latest `REPORT_LATENCIES_KEPT`):
    /// the time from its look being asked for (a gate firing) to the broker's acknowledgement.
    pub report_latencies: Vec<Duration>,
}

/// Report latencies a publisher keeps for its final report.
pub const REPORT_LATENCIES_KEPT: usize = 1024;

/// The publisher's figures, for `<root>/stats`, kept current by the publisher task.
#[derive(Debug, Default)]
pub struct PublisherGauges {
    /// Beaten by the publisher's loop, which wakes at least every `HEARTBEAT_EVERY`.
    pub heartbeat: Heartbeat,
    pub connected: AtomicBool,
    pub events_delivered: AtomicU64,
    pub outbox_messages: AtomicU64,
    pub outbox_bytes: AtomicU64,
    pub outbox_dropped: AtomicU64,
    /// Milliseconds from the latest acknowledged report's gate firing to its acknowledgement; 0
    /// until one is.
    pub last_report_latency_ms: AtomicU64,
}

/// A snapshot of [`PublisherGauges`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PublisherFigures {
    pub connected: bool,
    pub events_delivered: u64,
    pub outbox_messages: u64,
    pub outbox_bytes: u64,
    pub outbox_dropped: u64,
    /// From a gate firing to the broker acknowledging the report it led to, for the latest one.
    pub last_report_latency_ms: Option<u64>,
}

impl PublisherGauges {
    pub fn snapshot(&self) -> PublisherFigures {
        PublisherFigures {
            connected: self.connected.load(Ordering::Relaxed),
            events_delivered: self.events_delivered.load(Ordering::Relaxed),
            outbox_messages: self.outbox_messages.load(Ordering::Relaxed),
            outbox_bytes: self.outbox_bytes.load(Ordering::Relaxed),
            outbox_dropped: self.outbox_dropped.load(Ordering::Relaxed),
            last_report_latency_ms: Some(self.last_report_latency_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0),
        }
    }
}

/// The running publisher task.
pub struct PublisherHandle {
    gauges: Arc<PublisherGauges>,
    events: mpsc::Sender<Event>,
    control: mpsc::UnboundedSender<Control>,
    commands: Option<mpsc::Receiver<Inbound>>,
    devices: DeviceReporters,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<PublisherReport>>,
}

impl PublisherHandle {
    /// Where the gates send events.
    pub fn events(&self) -> mpsc::Sender<Event> {
        self.events.clone()
    }

    pub fn figures(&self) -> PublisherFigures {
        self.gauges.snapshot()
    }

    pub fn heartbeat(&self) -> &Heartbeat {
        &self.gauges.heartbeat
    }

    /// Where the sources report their devices' state.
    pub fn devices(&self) -> DeviceReporters {
        self.devices.clone()
    }

    /// The commands received, checked and allowed, for the service to carry out; taken once.
    pub fn take_commands(&mut self) -> Option<mpsc::Receiver<Inbound>> {
        self.commands.take()
    }

    /// Publishes the answer to a command.
    pub fn reply(&self, reply: CommandReply) {
        let _ = self.control.send(Control::Reply(reply));
    }

    /// Publishes a report, alert or tool call through the outbox.
    pub fn publish(&self, publication: Publication) {
        let _ = self.control.send(Control::Publish(publication));
    }

    /// Removes the station's device from Home Assistant, and stops announcing it.
    pub fn forget_home_assistant(&self) {
        let _ = self.control.send(Control::ForgetHomeAssistant);
    }

    /// Publishes the station's figures on `<root>/stats`; an older figure not yet sent is replaced.
    pub fn stats(&self, json: String) {
        let _ = self.control.send(Control::Stats(json));
    }

    /// Takes what is already in the event queue, flushes (at most `FLUSH_TIMEOUT` for the acks),
    /// publishes `stopped` and disconnects. Does not wait on senders still open: a gate stuck
    /// behind a full queue must not hold up a stop.
    /// Stopping again reports nothing more.
    pub async fn stop(&mut self) -> Result<PublisherReport, tokio::task::JoinError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await,
            None => Ok(PublisherReport::default()),
        }
    }
}

/// Opens the outbox and starts the publisher task; what the outbox held from an earlier run is
/// published first.
pub fn spawn(config: &Config, echo: bool) -> Result<PublisherHandle, PublishError> {
    // The certificates are read once, for both versions.
    let tls = match &config.mqtt.tls {
        Some(tls) => {
            Some(Transport::tls_with_config(TlsConfiguration::Rustls(tls::client_config(tls, &config.base_dir)?)))
        }
        None => None,
    };
    let options = mqtt_options(config, tls.clone());
    let options_v5 = mqtt5_options(config, tls);
    let (outbox, held) = Outbox::open(&config.outbox_dir(), config.outbox_max_bytes())?;
    if !held.is_empty() {
        info!("outbox {}: {} messages from an earlier run to deliver first", outbox.dir().display(), held.len());
    }
    let (events, events_rx) = mpsc::channel(config.queues.events);
    let (control, control_rx) = mpsc::unbounded_channel();
    let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (stop, stop_rx) = oneshot::channel();
    let (camera, camera_rx) = StatusReporter::new();
    let (microphone, microphone_rx) = StatusReporter::new();
    let gauges = Arc::new(PublisherGauges::default());
    let mut publisher = Publisher::new(config, (options, options_v5), echo, outbox, commands_tx, Arc::clone(&gauges));
    for message in held {
        publisher.enqueue_held(message);
    }
    let devices_rx = DeviceWatch { camera: camera_rx, microphone: microphone_rx };
    Ok(PublisherHandle {
        gauges,
        events,
        control,
        commands: Some(commands),
        devices: DeviceReporters { camera, microphone },
        stop: Some(stop),
        task: Some(tokio::spawn(
            publisher
                .run(events_rx, control_rx, devices_rx, stop_rx)
                .instrument(tracing::info_span!("stage", stage = "publisher")),
        )),
    })
}

/// The station's device in Home Assistant.
struct Discovery {
    config_topic: String,
    /// Home Assistant says `online` here when it starts: the device is announced again.
    birth_topic: String,
    payload: String,
    /// Removed on request: not announced again.
    forgotten: bool,
}

/// From the service to the publisher.
enum Control {
    Publish(Publication),
    ForgetHomeAssistant,
    Reply(CommandReply),
    Stats(String),
}

/// The publisher's ends of the device reporters.
struct DeviceWatch {
    camera: watch::Receiver<Option<DeviceStatus>>,
    microphone: watch::Receiver<Option<DeviceStatus>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Status,
    /// A camera's or microphone's state, or the station's figures: only the latest per topic matters.
    Latest,
    /// Kept in the outbox: events, reports, alerts, tool calls.
    Stored,
    Reply,
}

#[derive(Debug)]
struct Message {
    topic: String,
    payload: String,
    retain: bool,
    kind: Kind,
    /// Its copy in the outbox, if it has one.
    stored: Option<Stored>,
    /// For a report of this run: when its look was asked for, to time its delivery.
    report_asked_at: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy)]
struct Stored {
    seq: u64,
    created_at: SystemTime,
    /// Held back: left by an earlier run, or waiting while the connection was down.
    held: bool,
}

impl Message {
    /// A message with no copy in the outbox: a status, a latest figure or a reply.
    fn unstored(topic: String, payload: String, retain: bool, kind: Kind) -> Self {
        Self { topic, payload, retain, kind, stored: None, report_asked_at: None }
    }

    /// The payload to send now: a message on its way late says so.
    fn payload_to_send(&self) -> std::borrow::Cow<'_, str> {
        let Some(stored) = self.stored else { return self.payload.as_str().into() };
        let late = stored.created_at.elapsed().is_ok_and(|age| age > HISTORICAL_AFTER);
        if !(late || stored.held) {
            return self.payload.as_str().into();
        }
        match serde_json::from_str::<serde_json::Value>(&self.payload) {
            Ok(serde_json::Value::Object(mut object)) => {
                object.insert("historical".into(), true.into());
                serde_json::Value::Object(object).to_string().into()
            }
            _ => self.payload.as_str().into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Queued,
    /// Given to the current connection's client; its packet id comes with `Outgoing::Publish`.
    Handed,
    Sent {
        pkid: u16,
    },
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    message: Message,
    delivery: Delivery,
}

/// What a connection's event-loop task reports.
#[derive(Debug)]
enum SessionNotice {
    Connected,
    Sent { pkid: u16 },
    Acked { pkid: u16 },
    Received { topic: String, payload: Vec<u8>, correlation: Option<Vec<u8>> },
    Lost(String),
    Disconnected,
}

/// The MQTT version a connection speaks: 5 when the broker does, 3.1.1 otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    V5,
    V311,
}

/// A connection's client, of either version.
enum Client {
    V311(AsyncClient),
    V5(v5::AsyncClient),
}

impl Client {
    fn try_publish(
        &self,
        topic: &str,
        retain: bool,
        payload: &[u8],
        properties: Option<PublishProperties>,
    ) -> Result<(), String> {
        let payload = payload.to_vec();
        match (self, properties) {
            (Client::V311(client), _) => {
                client.try_publish(topic, QoS::AtLeastOnce, retain, payload).map_err(|e| e.to_string())
            }
            (Client::V5(client), Some(properties)) => client
                .try_publish_with_properties(topic, v5::mqttbytes::QoS::AtLeastOnce, retain, payload, properties)
                .map_err(|e| e.to_string()),
            (Client::V5(client), None) => {
                client.try_publish(topic, v5::mqttbytes::QoS::AtLeastOnce, retain, payload).map_err(|e| e.to_string())
            }
        }
    }

    fn try_subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V311(client) => client.try_subscribe(filter, QoS::AtLeastOnce).map_err(|e| e.to_string()),
            Client::V5(client) => {
                client.try_subscribe(filter, v5::mqttbytes::QoS::AtLeastOnce).map_err(|e| e.to_string())
            }
        }
    }

    async fn disconnect(&self) -> Result<(), String> {
        match self {
            Client::V311(client) => client.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(client) => client.disconnect().await.map_err(|e| e.to_string()),
        }
    }
}

struct Session {
    id: u64,
    client: Client,
    protocol: Protocol,
    connected: bool,
    /// Sequence numbers handed over, waiting for their packet ids, oldest first.
    handed: VecDeque<u64>,
}

struct Publisher {
    options: MqttOptions,
    options_v5: v5::MqttOptions,
    /// The version the next connection tries.
    protocol: Protocol,
    /// A connection has succeeded with `protocol`: no more switching.
    protocol_settled: bool,
    message_expiry: u32,
    broker: String,
    topics: Topics,
    echo: bool,
    reconnect_min: Duration,
    reconnect_max: Duration,
    backoff: Duration,
    unacked: VecDeque<Pending>,
    next_seq: u64,
    session: Option<Session>,
    /// The latest state of each device, by topic, published again on every new connection: a
    /// broker restarted without persistence has forgotten the retained copies.
    devices_last: Vec<(String, DeviceStatus)>,
    sessions_started: u64,
    reconnect_at: Option<Instant>,
    notices_tx: mpsc::UnboundedSender<(u64, SessionNotice)>,
    notices_rx: mpsc::UnboundedReceiver<(u64, SessionNotice)>,
    outbox: Outbox,
    home_assistant: Option<Discovery>,
    /// A connection was lost and no new one is up yet.
    outage: bool,
    commands: mpsc::Sender<Inbound>,
    allowed_commands: Vec<String>,
    gauges: Arc<PublisherGauges>,
    report: PublisherReport,
}

/// The same for MQTT 5.
fn mqtt5_options(config: &Config, tls: Option<Transport>) -> v5::MqttOptions {
    let mqtt = &config.mqtt;
    let mut options = v5::MqttOptions::new(config.client_id(), mqtt.host.clone(), mqtt.port);
    let will = v5::mqttbytes::v5::LastWill::new(
        Topics::new(config).status,
        STATUS_OFFLINE,
        v5::mqttbytes::QoS::AtLeastOnce,
        true,
        None,
    );
    options
        .set_keep_alive(Duration::from_secs(mqtt.keep_alive_secs as u64))
        .set_clean_start(true)
        .set_outgoing_inflight_upper_limit(RUMQTTC_IN_FLIGHT)
        .set_max_packet_size(Some(MAX_INCOMING_BYTES as u32))
        .set_last_will(will);
    if let Some(username) = &mqtt.username {
        options.set_credentials(username.clone(), mqtt.password.clone().unwrap_or_default());
    }
    if let Some(transport) = tls {
        options.set_transport(transport);
    }
    options
}

/// MQTT 5 properties by topic: reports and alerts expire (`[mqtt] message_expiry_secs`) and say
/// their schema version; a tool call names where its result goes and the id to answer with.
fn properties_for(topics: &Topics, expiry: u32, message: &Message) -> Option<PublishProperties> {
    let kind = message.topic.strip_prefix(&topics.root)?.strip_prefix('/')?;
    let json = || PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        message_expiry_interval: (expiry > 0).then_some(expiry),
        ..PublishProperties::default()
    };
    match kind {
        "report" => Some(PublishProperties {
            user_properties: vec![("schema_version".into(), SceneReport::SCHEMA_VERSION.to_string())],
            ..json()
        }),
        "alert" => Some(json()),
        _ if kind.starts_with("tool/") && kind.matches('/').count() == 1 => {
            let id = serde_json::from_str::<serde_json::Value>(&message.payload)
                .ok()
                .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned))?;
            Some(PublishProperties {
                response_topic: Some(format!("{}/result", message.topic)),
                correlation_data: Some(id.into_bytes().into()),
                ..json()
            })
        }
        _ => None,
    }
}

/// How to reach the broker: address, credentials, transport (TLS), and the last will.
fn mqtt_options(config: &Config, tls: Option<Transport>) -> MqttOptions {
    let mqtt = &config.mqtt;
    let mut options = MqttOptions::new(config.client_id(), mqtt.host.clone(), mqtt.port);
    options
        .set_keep_alive(Duration::from_secs(mqtt.keep_alive_secs as u64))
        .set_clean_session(true)
        .set_inflight(RUMQTTC_IN_FLIGHT)
        .set_max_packet_size(MAX_INCOMING_BYTES, MAX_OUTGOING_BYTES)
        .set_last_will(LastWill::new(Topics::new(config).status, STATUS_OFFLINE, QoS::AtLeastOnce, true));
    if let Some(username) = &mqtt.username {
        options.set_credentials(username.clone(), mqtt.password.clone().unwrap_or_default());
    }
    if let Some(transport) = tls {
        options.set_transport(transport);
    }
    options
}

impl Publisher {
    fn new(
        config: &Config,
        (options, options_v5): (MqttOptions, v5::MqttOptions),
        echo: bool,
        outbox: Outbox,
        commands: mpsc::Sender<Inbound>,
        gauges: Arc<PublisherGauges>,
    ) -> Self {
        let topics = Topics::new(config);
        let mqtt = &config.mqtt;
        let (notices_tx, notices_rx) = mpsc::unbounded_channel();
        let reconnect_min = Duration::from_secs_f64(mqtt.reconnect_min_secs);
        Self {
            options,
            options_v5,
            protocol: Protocol::V5,
            protocol_settled: false,
            message_expiry: mqtt.message_expiry_secs,
            broker: format!("{}:{}", mqtt.host, mqtt.port),
            topics,
            echo,
            reconnect_min,
            reconnect_max: Duration::from_secs_f64(mqtt.reconnect_max_secs),
            backoff: reconnect_min,
            unacked: VecDeque::new(),
            next_seq: 0,
            session: None,
            devices_last: Vec::new(),
            sessions_started: 0,
            reconnect_at: Some(Instant::now()),
            notices_tx,
            notices_rx,
            outbox,
            home_assistant: config.home_assistant.enabled.then(|| Discovery {
                config_topic: home_assistant::config_topic(config),
                birth_topic: home_assistant::birth_topic(config),
                payload: home_assistant::discovery_payload(config),
                forgotten: false,
            }),
            outage: false,
            commands,
            allowed_commands: config.commands.allowed.clone(),
            gauges,
            report: PublisherReport::default(),
        }
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut devices: DeviceWatch,
        mut stop: oneshot::Receiver<()>,
    ) -> PublisherReport {
        let mut stopping = false;
        let mut flush_deadline: Option<Instant> = None;
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.gauges.heartbeat.beat();
            self.hand_over();
            self.update_gauges();
            if stopping && flush_deadline.is_none() {
                // The devices' retained states would otherwise say `online` after the station stopped.
                for (topic, last) in self.devices_last.clone() {
                    self.enqueue_device(topic, Some(DeviceStatus::stopped(&last.source)));
                }
                self.enqueue_status(STATUS_STOPPED);
                self.hand_over();
                flush_deadline = Some(Instant::now() + FLUSH_TIMEOUT);
            }
            if flush_deadline.is_some() && self.unacked.is_empty() {
                break;
            }
            tokio::select! {
                event = events.recv(), if !stopping => match event {
                    Some(event) => self.enqueue_event(&event),
                    None => stopping = true,
                },
                _ = &mut stop, if !stopping => {
                    stopping = true;
                    // What the gates managed to queue is kept.
                    events.close();
                    while let Ok(event) = events.try_recv() {
                        self.enqueue_event(&event);
                    }
                }
                Some(control) = control.recv() => match control {
                    Control::Publish(publication) => self.enqueue_publication(publication),
                    Control::Reply(reply) => self.enqueue_reply(reply),
                    Control::ForgetHomeAssistant => {
                        if let Some(discovery) = self.home_assistant.as_mut() {
                            discovery.forgotten = true;
                            let topic = discovery.config_topic.clone();
                            info!("removing the device from Home Assistant ({topic})");
                            self.replace_queued(topic, String::new(), true);
                        }
                    }
                    Control::Stats(json) => self.enqueue_latest(self.topics.stats.clone(), json),
                },
                Ok(()) = devices.camera.changed() => {
                    let status = devices.camera.borrow_and_update().clone();
                    self.enqueue_device(self.topics.camera_status.clone(), status);
                }
                Ok(()) = devices.microphone.changed() => {
                    let status = devices.microphone.borrow_and_update().clone();
                    self.enqueue_device(self.topics.microphone_status.clone(), status);
                }
                Some((session, notice)) = self.notices_rx.recv() => self.on_notice(session, notice),
                () = sleep_until(self.reconnect_at.unwrap_or_else(Instant::now)), if self.session.is_none() && self.reconnect_at.is_some() => {
                    self.start_session();
                }
                () = sleep_until(flush_deadline.unwrap_or_else(Instant::now)), if flush_deadline.is_some() => {
                    break;
                }
                _ = heartbeat.tick() => {}
            }
        }
        self.gauges.heartbeat.retire();
        self.report.events_undelivered = self.unacked.iter().filter(|p| p.message.kind == Kind::Stored).count();
        self.report.outbox_held = self.outbox.len();
        if self.report.events_undelivered > 0 {
            warn!(
                "{} events were not acknowledged by the broker at {} before the stop; the outbox {} keeps \
                 {} messages for the next start",
                self.report.events_undelivered,
                self.broker,
                self.outbox.dir().display(),
                self.report.outbox_held
            );
        }
        self.disconnect().await;
        self.report
    }

    fn update_gauges(&self) {
        let gauges = &self.gauges;
        gauges.connected.store(self.session.as_ref().is_some_and(|s| s.connected), Ordering::Relaxed);
        gauges.events_delivered.store(self.report.events_delivered, Ordering::Relaxed);
        gauges.outbox_messages.store(self.outbox.len() as u64, Ordering::Relaxed);
        gauges.outbox_bytes.store(self.outbox.bytes(), Ordering::Relaxed);
        gauges.outbox_dropped.store(self.outbox.dropped(), Ordering::Relaxed);
    }

    fn enqueue(&mut self, message: Message) {
        self.enqueue_at(self.unacked.len(), message);
    }

    /// Queues `message` at `index` of the queue (0: next to go).
    fn enqueue_at(&mut self, index: usize, message: Message) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.insert(index, Pending { seq, message, delivery: Delivery::Queued });
    }

    fn enqueue_event(&mut self, event: &Event) {
        let label = format!("{} event {}", event.kind(), event.id);
        self.enqueue_stored(self.topics.events.clone(), event.to_json(), PRIORITY_EVENT, &label, None);
    }

    fn enqueue_publication(&mut self, publication: Publication) {
        let Publication { subtopic, payload, priority, label, asked_at } = publication;
        let report_asked_at = (subtopic == "report").then_some(asked_at);
        let topic = format!("{}/{}", self.topics.root, subtopic);
        self.enqueue_stored(topic, payload, priority, &label, report_asked_at);
    }

    /// Writes a message to the outbox, then queues it.
    fn enqueue_stored(
        &mut self,
        topic: String,
        payload: String,
        priority: Priority,
        label: &str,
        report_asked_at: Option<SystemTime>,
    ) {
        let stored = match self.outbox.append(&topic, &payload, priority, SystemTime::now()) {
            Ok((message, dropped)) => {
                debug!("{label} stored in the outbox as message {}", message.seq);
                self.forget_dropped(&dropped);
                (!dropped.contains(&message.seq)).then_some(Stored {
                    seq: message.seq,
                    created_at: message.created_at(),
                    held: self.outage,
                })
            }
            Err(e) => {
                // Still published from memory: a full or failing disk must not stop the alerts.
                error!("cannot write {label} to the outbox, it is held in memory only: {e}");
                None
            }
        };
        self.enqueue(Message { topic, payload, retain: false, kind: Kind::Stored, stored, report_asked_at });
    }

    /// Times a report's delivery from its gate firing: in the stats, and in the final report.
    fn report_delivered(&mut self, asked_at: SystemTime) {
        // A clock set back meanwhile gives no figure rather than a false one.
        let Ok(latency) = SystemTime::now().duration_since(asked_at) else { return };
        let millis = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX).max(1);
        self.gauges.last_report_latency_ms.store(millis, Ordering::Relaxed);
        let kept = &mut self.report.report_latencies;
        if kept.len() == REPORT_LATENCIES_KEPT {
            kept.remove(0);
        }
        kept.push(latency);
    }

    /// A message an earlier run left in the outbox.
    fn enqueue_held(&mut self, message: StoredMessage) {
        let stored = Some(Stored { seq: message.seq, created_at: message.created_at(), held: true });
        self.enqueue(Message {
            topic: message.topic,
            payload: message.payload,
            retain: false,
            kind: Kind::Stored,
            stored,
            report_asked_at: None,
        });
    }

    /// The outbox dropped these to stay under its cap: those not yet handed over go too.
    fn forget_dropped(&mut self, dropped: &[u64]) {
        self.unacked
            .retain(|p| p.delivery != Delivery::Queued || !p.message.stored.is_some_and(|s| dropped.contains(&s.seq)));
    }

    fn enqueue_status(&mut self, status: &str) {
        self.enqueue(Message::unstored(self.topics.status.clone(), status.into(), true, Kind::Status));
    }

    /// Queues a device's state in place of an older one for the same topic that has not gone
    /// out yet: a dashboard wants the latest state, not every flap while the link was down.
    fn enqueue_device(&mut self, topic: String, status: Option<DeviceStatus>) {
        let Some(status) = status else { return };
        debug!("{topic}: {}", status.to_json());
        let payload = status.to_json();
        self.devices_last.retain(|(t, _)| *t != topic);
        self.devices_last.push((topic.clone(), status));
        self.replace_queued(topic, payload, true);
    }

    /// The station's figures: not retained (they are stale once the station is gone).
    fn enqueue_latest(&mut self, topic: String, payload: String) {
        self.replace_queued(topic, payload, false);
    }

    /// Queues a message in place of an older one for the same topic not yet handed over.
    fn replace_queued(&mut self, topic: String, payload: String, retain: bool) {
        self.unacked.retain(|p| {
            !(p.message.kind == Kind::Latest && p.message.topic == topic && p.delivery == Delivery::Queued)
        });
        self.enqueue(Message::unstored(topic, payload, retain, Kind::Latest));
    }

    fn enqueue_reply(&mut self, reply: CommandReply) {
        let topic = if reply.command.starts_with("tool/") {
            format!("{}/{}/reply", self.topics.root, reply.command)
        } else {
            format!("{}{}/reply", self.topics.commands, reply.command)
        };
        self.enqueue(Message::unstored(topic, reply.to_json(), false, Kind::Reply));
    }

    /// A tool's answer to a call: checked here, passed on to the model stage if well-formed.
    fn on_tool_result(&mut self, tool: &str, payload: &[u8], correlation: Option<&[u8]>) {
        match command::parse_tool_result(tool, payload, correlation) {
            Ok(result) => {
                info!("result of tool call {} ({tool}) received", result.call_id);
                if let Err(
                    mpsc::error::TrySendError::Full(Inbound::ToolResult(result))
                    | mpsc::error::TrySendError::Closed(Inbound::ToolResult(result)),
                ) = self.commands.try_send(Inbound::ToolResult(result))
                {
                    self.enqueue_reply(result.reply(false, "the station is busy; send the result again"));
                }
            }
            Err(why) => {
                warn!("refused a result for tool `{tool}`: {why}");
                let reply = CommandReply {
                    command: ToolResult::reply_to(tool),
                    id: command::salvage_id(payload),
                    ok: false,
                    message: why,
                };
                self.enqueue_reply(reply);
            }
        }
    }

    /// A message on a subscribed topic: a command, checked here, passed on to the service if it
    /// is well-formed and allowed, answered with the reason if not.
    fn on_received(&mut self, topic: &str, payload: &[u8], correlation: Option<&[u8]>) {
        if let Some(discovery) = self.home_assistant.as_ref().filter(|d| d.birth_topic == topic) {
            if payload == b"online" && !discovery.forgotten {
                debug!("Home Assistant is online: announcing the device again");
                let (topic, payload) = (discovery.config_topic.clone(), discovery.payload.clone());
                self.replace_queued(topic, payload, true);
            }
            return;
        }
        let tool = topic
            .strip_prefix(&self.topics.root)
            .and_then(|t| t.strip_prefix("/tool/"))
            .and_then(|t| t.strip_suffix("/result"))
            .filter(|name| !name.contains('/'));
        if let Some(tool) = tool {
            self.on_tool_result(tool, payload, correlation);
            return;
        }
        let Some(name) = topic.strip_prefix(&self.topics.commands) else { return };
        match command::parse(name, payload, &self.allowed_commands) {
            Ok(request) => {
                info!("command `{}` received", request.command.name());
                if let Err(
                    mpsc::error::TrySendError::Full(Inbound::Command(request))
                    | mpsc::error::TrySendError::Closed(Inbound::Command(request)),
                ) = self.commands.try_send(Inbound::Command(request))
                {
                    let reply = CommandReply::failed(
                        request.command.name(),
                        request.id,
                        "the station is busy with earlier commands; try again",
                    );
                    self.enqueue_reply(reply);
                }
            }
            Err(e) => {
                warn!("refused a command on {topic}: {e}");
                let name = if command::NAMES.contains(&name) { name } else { "unknown" };
                self.enqueue_reply(CommandReply::failed(name, command::salvage_id(payload), e.to_string()));
            }
        }
    }

    /// Gives queued messages to the connected client, oldest first, within the in-flight window.
    fn hand_over(&mut self) {
        let Some(session) = self.session.as_mut().filter(|s| s.connected) else { return };
        let in_flight = self.unacked.iter().filter(|p| p.delivery != Delivery::Queued).count();
        let room = MAX_IN_FLIGHT.saturating_sub(in_flight);
        for pending in self.unacked.iter_mut().filter(|p| p.delivery == Delivery::Queued).take(room) {
            let message = &pending.message;
            let payload = message.payload_to_send();
            let properties = match session.protocol {
                Protocol::V5 => properties_for(&self.topics, self.message_expiry, message),
                Protocol::V311 => None,
            };
            let result = session.client.try_publish(&message.topic, message.retain, payload.as_bytes(), properties);
            if let Err(e) = result {
                debug!("client queue full, holding messages back: {e}");
                break;
            }
            pending.delivery = Delivery::Handed;
            session.handed.push_back(pending.seq);
        }
    }

    fn start_session(&mut self) {
        self.sessions_started += 1;
        let id = self.sessions_started;
        let client = match self.protocol {
            Protocol::V5 => {
                let (client, eventloop) = v5::AsyncClient::new(self.options_v5.clone(), MAX_IN_FLIGHT + 8);
                tokio::spawn(drive_session_v5(id, eventloop, self.notices_tx.clone()));
                Client::V5(client)
            }
            Protocol::V311 => {
                let (client, eventloop) = AsyncClient::new(self.options.clone(), MAX_IN_FLIGHT + 8);
                tokio::spawn(drive_session(id, eventloop, self.notices_tx.clone()));
                Client::V311(client)
            }
        };
        let protocol = self.protocol;
        self.session = Some(Session { id, client, protocol, connected: false, handed: VecDeque::new() });
        self.reconnect_at = None;
        debug!("connecting to broker at {} (attempt {id})", self.broker);
    }

    fn on_notice(&mut self, session_id: u64, notice: SessionNotice) {
        let Some(session) = self.session.as_mut().filter(|s| s.id == session_id) else {
            return; // from a connection already given up
        };
        match notice {
            SessionNotice::Connected => {
                session.connected = true;
                self.outage = false;
                self.protocol_settled = true;
                let version = if session.protocol == Protocol::V5 { "MQTT 5" } else { "MQTT 3.1.1" };
                info!("connected to MQTT broker at {} as {} ({version})", self.broker, self.options.client_id());
                // A clean session forgets subscriptions: ask again on every connection.
                let Some(session) = self.session.as_ref() else { return };
                let birth = self.home_assistant.as_ref().map(|d| d.birth_topic.clone());
                for filter in [format!("{}+", self.topics.commands), format!("{}/tool/+/result", self.topics.root)]
                    .into_iter()
                    .chain(birth)
                {
                    if let Err(e) = session.client.try_subscribe(&filter) {
                        warn!("cannot subscribe to {filter}: {e}");
                    }
                }
                self.backoff = self.reconnect_min;
                // A fresh `online` goes first; one left over from a dropped connection is stale.
                self.unacked.retain(|p| !(p.message.kind == Kind::Status && p.message.payload == STATUS_ONLINE));
                let message = Message::unstored(self.topics.status.clone(), STATUS_ONLINE.into(), true, Kind::Status);
                self.enqueue_at(0, message);
                // The device is announced again: a broker without persistence has forgotten it.
                if let Some(discovery) = self.home_assistant.as_ref().filter(|d| !d.forgotten) {
                    let (topic, payload) = (discovery.config_topic.clone(), discovery.payload.clone());
                    self.unacked.retain(|p| p.message.topic != topic || p.delivery != Delivery::Queued);
                    self.enqueue_at(1, Message::unstored(topic, payload, true, Kind::Latest));
                }
                for (topic, status) in self.devices_last.clone() {
                    if !self.unacked.iter().any(|p| p.message.kind == Kind::Latest && p.message.topic == topic) {
                        let payload = status.to_json();
                        self.enqueue_at(1, Message::unstored(topic, payload, true, Kind::Latest));
                    }
                }
            }
            SessionNotice::Received { topic, payload, correlation } => {
                self.on_received(&topic, &payload, correlation.as_deref())
            }
            SessionNotice::Sent { pkid } => {
                if let Some(seq) = session.handed.pop_front() {
                    if let Some(pending) = self.unacked.iter_mut().find(|p| p.seq == seq) {
                        pending.delivery = Delivery::Sent { pkid };
                    }
                }
            }
            SessionNotice::Acked { pkid } => {
                let Some(index) = self.unacked.iter().position(|p| p.delivery == Delivery::Sent { pkid }) else {
                    return;
                };
                if let Some(done) = self.unacked.remove(index) {
                    if done.message.kind == Kind::Stored {
                        self.report.events_delivered += 1;
                    }
                    if let Some(stored) = done.message.stored {
                        if let Err(e) = self.outbox.acknowledge(stored.seq) {
                            error!(
                                "cannot record a delivery in the outbox (it may be sent again after a restart): {e}"
                            );
                        }
                    }
                    if let Some(asked_at) = done.message.report_asked_at {
                        self.report_delivered(asked_at);
                    }
                    if self.echo {
                        println!("{} {}", done.message.topic, done.message.payload);
                    }
                }
            }
            SessionNotice::Lost(why) => {
                let was_connected = session.connected;
                let tried = session.protocol;
                self.session = None;
                self.outage |= was_connected;
                for pending in &mut self.unacked {
                    pending.delivery = Delivery::Queued;
                    if let Some(stored) = pending.message.stored.as_mut() {
                        stored.held |= was_connected;
                    }
                }
                if !self.protocol_settled && tried == Protocol::V5 {
                    // A broker that speaks only 3.1.1 refuses (or cannot read) an MQTT 5 CONNECT:
                    // try 3.1.1 at once; until one version connects, attempts alternate.
                    debug!("MQTT 5 connection to {} failed ({why}); trying MQTT 3.1.1", self.broker);
                    self.protocol = Protocol::V311;
                    self.reconnect_at = Some(Instant::now());
                    return;
                }
                if !self.protocol_settled {
                    self.protocol = Protocol::V5;
                }
                let wait = self.backoff;
                self.backoff = (self.backoff * 2).min(self.reconnect_max);
                self.reconnect_at = Some(Instant::now() + wait);
                let held = self.unacked.len();
                if was_connected {
                    warn!(
                        "lost connection to MQTT broker at {}: {why}; reconnecting in {wait:?} ({held} messages held)",
                        self.broker
                    );
                } else {
                    warn!(
                        "cannot connect to MQTT broker at {}: {why}; retrying in {wait:?} ({held} messages held)",
                        self.broker
                    );
                }
            }
            SessionNotice::Disconnected => self.session = None,
        }
    }

    /// Ends the connection with a DISCONNECT, so the broker drops the last will.
    async fn disconnect(&mut self) {
        let Some(session) = self.session.as_ref().filter(|s| s.connected) else { return };
        let id = session.id;
        if session.client.disconnect().await.is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Ok(Some((session, notice))) = tokio::time::timeout_at(deadline, self.notices_rx.recv()).await {
            if session == id && matches!(notice, SessionNotice::Disconnected | SessionNotice::Lost(_)) {
                info!("disconnected from MQTT broker at {}", self.broker);
                return;
            }
        }
    }
}

/// [`drive_session`] for an MQTT 5 connection.
async fn drive_session_v5(id: u64, mut eventloop: v5::EventLoop, notices: mpsc::UnboundedSender<(u64, SessionNotice)>) {
    use v5::mqttbytes::v5::{Packet as Packet5, PubAckReason};
    loop {
        let notice = match eventloop.poll().await {
            Ok(v5::Event::Incoming(Packet5::ConnAck(_))) => SessionNotice::Connected,
            Ok(v5::Event::Incoming(Packet5::PubAck(ack))) => {
                if !matches!(ack.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers) {
                    warn!("the broker took a message but did not pass it on: {:?}", ack.reason);
                }
                SessionNotice::Acked { pkid: ack.pkid }
            }
            Ok(v5::Event::Incoming(Packet5::Publish(publish))) => SessionNotice::Received {
                topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                payload: publish.payload.to_vec(),
                correlation: publish.properties.and_then(|p| p.correlation_data).map(|c| c.to_vec()),
            },
            Ok(v5::Event::Outgoing(Outgoing::Publish(pkid))) => SessionNotice::Sent { pkid },
            Ok(v5::Event::Outgoing(Outgoing::Disconnect)) => SessionNotice::Disconnected,
            Ok(_) => continue,
            Err(e) => SessionNotice::Lost(e.to_string()),
        };
        let last = matches!(notice, SessionNotice::Lost(_) | SessionNotice::Disconnected);
        if notices.send((id, notice)).is_err() || last {
            return;
        }
    }
}

/// Polls one connection's event loop until the connection ends, reporting what matters.
async fn drive_session(id: u64, mut eventloop: EventLoop, notices: mpsc::UnboundedSender<(u64, SessionNotice)>) {
    loop {
        let notice = match eventloop.poll().await {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => SessionNotice::Connected,
            Ok(rumqttc::Event::Incoming(Packet::PubAck(ack))) => SessionNotice::Acked { pkid: ack.pkid },
            Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => SessionNotice::Received {
                topic: publish.topic.clone(),
                payload: publish.payload.to_vec(),
                correlation: None,
            },
            Ok(rumqttc::Event::Outgoing(Outgoing::Publish(pkid))) => SessionNotice::Sent { pkid },
            Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) => SessionNotice::Disconnected,
            Ok(_) => continue,
            Err(e) => SessionNotice::Lost(e.to_string()),
        };
        let last = matches!(notice, SessionNotice::Lost(_) | SessionNotice::Disconnected);
        if notices.send((id, notice)).is_err() || last {
            return;
        }
    }
}
