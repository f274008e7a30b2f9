//! The MQTT sink: events out as JSON, the station's availability on a retained status topic, and
//! the camera's and microphone's state on retained topics of their own.
//!
//! Delivery is at least once. Every message stays in `unacked` until the broker's PUBACK; when a
//! connection drops, all of them are sent again on the next one, in their original order. Each
//! connection gets a fresh rumqttc client and event loop, so nothing a dead connection had
//! buffered can be sent twice behind our back or lost in rumqttc's own clean-session reset.

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::capture::{DeviceReporters, DeviceStatus, StatusReporter};
use crate::config::Config;
use crate::event::Event;

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

/// Topics of one station.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub status: String,
    pub events: String,
    pub camera_status: String,
    pub microphone_status: String,
}

impl Topics {
    pub fn new(config: &Config) -> Self {
        let root = config.topic_root();
        Self {
            status: format!("{root}/status"),
            events: format!("{root}/events"),
            camera_status: format!("{root}/camera/status"),
            microphone_status: format!("{root}/microphone/status"),
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
}

/// The running publisher task.
pub struct PublisherHandle {
    events: mpsc::Sender<Event>,
    devices: DeviceReporters,
    stop: oneshot::Sender<()>,
    task: JoinHandle<PublisherReport>,
}

impl PublisherHandle {
    /// Where the gates send events.
    pub fn events(&self) -> mpsc::Sender<Event> {
        self.events.clone()
    }

    /// Where the sources report their devices' state.
    pub fn devices(&self) -> DeviceReporters {
        self.devices.clone()
    }

    /// Takes what is already in the event queue, flushes (at most `FLUSH_TIMEOUT` for the acks),
    /// publishes `stopped` and disconnects. Does not wait on senders still open: a gate stuck
    /// behind a full queue must not hold up a stop.
    pub async fn stop(self) -> Result<PublisherReport, tokio::task::JoinError> {
        let _ = self.stop.send(());
        drop(self.events);
        self.task.await
    }
}

/// Starts the publisher task.
pub fn spawn(config: &Config, echo: bool) -> PublisherHandle {
    let (events, events_rx) = mpsc::channel(config.queues.events);
    let (stop, stop_rx) = oneshot::channel();
    let (camera, camera_rx) = StatusReporter::new();
    let (microphone, microphone_rx) = StatusReporter::new();
    let publisher = Publisher::new(config, echo);
    let devices_rx = DeviceWatch { camera: camera_rx, microphone: microphone_rx };
    PublisherHandle {
        events,
        devices: DeviceReporters { camera, microphone },
        stop,
        task: tokio::spawn(publisher.run(events_rx, devices_rx, stop_rx)),
    }
}

/// The publisher's ends of the device reporters.
struct DeviceWatch {
    camera: watch::Receiver<Option<DeviceStatus>>,
    microphone: watch::Receiver<Option<DeviceStatus>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Status,
    /// A camera's or microphone's state: only the latest one per topic matters.
    Device,
    Event,
}

#[derive(Debug)]
struct Message {
    topic: String,
    payload: String,
    retain: bool,
    kind: Kind,
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
    Lost(String),
    Disconnected,
}

struct Session {
    id: u64,
    client: AsyncClient,
    connected: bool,
    /// Sequence numbers handed over, waiting for their packet ids, oldest first.
    handed: VecDeque<u64>,
}

struct Publisher {
    options: MqttOptions,
    broker: String,
    topics: Topics,
    echo: bool,
    capacity: usize,
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
    report: PublisherReport,
}

impl Publisher {
    fn new(config: &Config, echo: bool) -> Self {
        let topics = Topics::new(config);
        let mqtt = &config.mqtt;
        let mut options = MqttOptions::new(config.client_id(), mqtt.host.clone(), mqtt.port);
        options
            .set_keep_alive(Duration::from_secs(mqtt.keep_alive_secs as u64))
            .set_clean_session(true)
            .set_inflight(RUMQTTC_IN_FLIGHT)
            .set_last_will(LastWill::new(&topics.status, STATUS_OFFLINE, QoS::AtLeastOnce, true));
        if let Some(username) = &mqtt.username {
            options.set_credentials(username.clone(), mqtt.password.clone().unwrap_or_default());
        }
        let (notices_tx, notices_rx) = mpsc::unbounded_channel();
        let reconnect_min = Duration::from_secs_f64(mqtt.reconnect_min_secs);
        Self {
            options,
            broker: format!("{}:{}", mqtt.host, mqtt.port),
            topics,
            echo,
            capacity: config.queues.events,
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
            report: PublisherReport::default(),
        }
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut devices: DeviceWatch,
        mut stop: oneshot::Receiver<()>,
    ) -> PublisherReport {
        let mut stopping = false;
        let mut flush_deadline: Option<Instant> = None;
        loop {
            self.hand_over();
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
            let room = self.unacked.len() < self.capacity;
            tokio::select! {
                event = events.recv(), if !stopping && room => match event {
                    Some(event) => self.enqueue_event(&event),
                    None => stopping = true,
                },
                _ = &mut stop, if !stopping => {
                    stopping = true;
                    // What the gates managed to queue is kept, past the capacity if need be.
                    events.close();
                    while let Ok(event) = events.try_recv() {
                        self.enqueue_event(&event);
                    }
                }
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
            }
        }
        self.report.events_undelivered = self.unacked.iter().filter(|p| p.message.kind == Kind::Event).count();
        if self.report.events_undelivered > 0 {
            warn!(
                "{} events were not acknowledged by the broker at {} before the stop",
                self.report.events_undelivered, self.broker
            );
        }
        self.disconnect().await;
        self.report
    }

    fn enqueue(&mut self, message: Message) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.push_back(Pending { seq, message, delivery: Delivery::Queued });
    }

    fn enqueue_event(&mut self, event: &Event) {
        self.enqueue(Message {
            topic: self.topics.events.clone(),
            payload: event.to_json(),
            retain: false,
            kind: Kind::Event,
        });
    }

    fn enqueue_status(&mut self, status: &str) {
        self.enqueue(Message {
            topic: self.topics.status.clone(),
            payload: status.into(),
            retain: true,
            kind: Kind::Status,
        });
    }

    /// Queues a device's state in place of an older one for the same topic that has not gone
    /// out yet: a dashboard wants the latest state, not every flap while the link was down.
    fn enqueue_device(&mut self, topic: String, status: Option<DeviceStatus>) {
        let Some(status) = status else { return };
        debug!("{topic}: {}", status.to_json());
        let payload = status.to_json();
        self.unacked.retain(|p| {
            !(p.message.kind == Kind::Device && p.message.topic == topic && p.delivery == Delivery::Queued)
        });
        self.devices_last.retain(|(t, _)| *t != topic);
        self.devices_last.push((topic.clone(), status));
        self.enqueue(Message { topic, payload, retain: true, kind: Kind::Device });
    }

    /// Gives queued messages to the connected client, oldest first, within the in-flight window.
    fn hand_over(&mut self) {
        let Some(session) = self.session.as_mut().filter(|s| s.connected) else { return };
        let in_flight = self.unacked.iter().filter(|p| p.delivery != Delivery::Queued).count();
        let room = MAX_IN_FLIGHT.saturating_sub(in_flight);
        for pending in self.unacked.iter_mut().filter(|p| p.delivery == Delivery::Queued).take(room) {
            let message = &pending.message;
            let result = session.client.try_publish(
                &message.topic,
                QoS::AtLeastOnce,
                message.retain,
                message.payload.as_bytes(),
            );
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
        let (client, eventloop) = AsyncClient::new(self.options.clone(), MAX_IN_FLIGHT + 8);
        tokio::spawn(drive_session(id, eventloop, self.notices_tx.clone()));
        self.session = Some(Session { id, client, connected: false, handed: VecDeque::new() });
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
                info!("connected to MQTT broker at {} as {}", self.broker, self.options.client_id());
                self.backoff = self.reconnect_min;
                // A fresh `online` goes first; one left over from a dropped connection is stale.
                self.unacked.retain(|p| !(p.message.kind == Kind::Status && p.message.payload == STATUS_ONLINE));
                let seq = self.next_seq;
                self.next_seq += 1;
                let message = Message {
                    topic: self.topics.status.clone(),
                    payload: STATUS_ONLINE.into(),
                    retain: true,
                    kind: Kind::Status,
                };
                self.unacked.push_front(Pending { seq, message, delivery: Delivery::Queued });
                for (topic, status) in self.devices_last.clone() {
                    if !self.unacked.iter().any(|p| p.message.kind == Kind::Device && p.message.topic == topic) {
                        let payload = status.to_json();
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        let message = Message { topic, payload, retain: true, kind: Kind::Device };
                        self.unacked.insert(1, Pending { seq, message, delivery: Delivery::Queued });
                    }
                }
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
                    if done.message.kind == Kind::Event {
                        self.report.events_delivered += 1;
                    }
                    if self.echo {
                        println!("{} {}", done.message.topic, done.message.payload);
                    }
                }
            }
            SessionNotice::Lost(why) => {
                let was_connected = session.connected;
                self.session = None;
                for pending in &mut self.unacked {
                    pending.delivery = Delivery::Queued;
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

/// Polls one connection's event loop until the connection ends, reporting what matters.
async fn drive_session(id: u64, mut eventloop: EventLoop, notices: mpsc::UnboundedSender<(u64, SessionNotice)>) {
    loop {
        let notice = match eventloop.poll().await {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => SessionNotice::Connected,
            Ok(rumqttc::Event::Incoming(Packet::PubAck(ack))) => SessionNotice::Acked { pkid: ack.pkid },
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
