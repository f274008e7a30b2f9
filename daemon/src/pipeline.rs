//! Wires sources to gates to the publisher's event channel, each stage on its own thread.
//!
//! ```text
//! camera source ──BoundedQueue<Frame>──▶ motion gate ─────────────┐
//!                                                                  ├──mpsc<Event>──▶ publisher
//! microphone ─────BoundedQueue<AudioChunk>──▶ sound + speech gates ┘
//! ```
//! Frames are dropped (oldest first, counted) when the motion gate falls behind; audio is never
//! dropped: the microphone waits instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::analysis::Inbox;
use crate::capture::{self, AudioChunk, DeviceReporters, Frame, SourceError, StatusReporter, StopFlag};
use crate::config::Config;
use crate::event::{Event, EventDetail};
use crate::gate::{MotionGate, SoundGate, SpeechEvent, SpeechGate, VadError};
use crate::queue::{BoundedQueue, Pop};
use crate::supervision::Heartbeat;

/// A source that fails this many times in a row is given up on.
const MAX_CONSECUTIVE_SOURCE_ERRORS: u32 = 10;
/// How often an idle gate looks up from its queue.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often a gate retries an event while the publisher's queue is full.
const SEND_RETRY_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
pub struct PipelineStats {
    pub frames_captured: AtomicU64,
    pub audio_chunks_captured: AtomicU64,
    pub events: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot start the speech gate: {0}")]
    SpeechGate(#[from] VadError),
}

/// The running sources and gates of one config.
pub struct Pipeline {
    frames: Option<Arc<BoundedQueue<Frame>>>,
    audio: Option<Arc<BoundedQueue<AudioChunk>>>,
    stats: Arc<PipelineStats>,
    /// Never sent on: `recv` returns `None` once every gate thread has finished.
    gates_done: mpsc::Receiver<()>,
    /// Tells live sources to leave their retry loops.
    stop: StopFlag,
    sources: Vec<std::thread::JoinHandle<()>>,
    /// Each gate thread's, by name (the sources' are their devices' [`StatusReporter`]s').
    gate_heartbeats: Vec<(&'static str, Heartbeat)>,
}

impl Pipeline {
    /// Opens the sources and starts every stage. Events go to `events`; what becomes of the
    /// camera and microphone goes to `devices`.
    /// With an `analysis` inbox, the model stage sees every event and the latest frame.
    pub fn start(
        config: &Config,
        events: mpsc::Sender<Event>,
        devices: &DeviceReporters,
        analysis: Option<Arc<Inbox>>,
    ) -> Result<Self, PipelineError> {
        let (gate_alive, gates_done) = mpsc::channel(1);
        let latest_frame = analysis.as_ref().map(|inbox| inbox.latest_frame().clone());
        let lanes = Lanes {
            stats: Arc::new(PipelineStats::default()),
            analysis,
            events,
            gate_alive,
            sources: std::sync::Mutex::new(Vec::new()),
            gate_heartbeats: std::sync::Mutex::new(Vec::new()),
        };
        let stop = StopFlag::default();

        // Everything is opened before any thread starts: when one part fails, what was opened
        // is closed again by dropping it, and a reload can fall back to the previous config
        // without a stray source holding its camera. The speech model comes first, before any
        // device is touched.
        let (motion, sound, speech) = (&config.gates.motion, &config.gates.sound, &config.gates.speech);
        let listening = config.microphone.is_some() && (sound.enabled || speech.enabled);
        let mut speech_gate = if listening && speech.enabled {
            let gate = SpeechGate::new(speech, &config.base_dir)?;
            info!("speech gate: silero VAD from {}", config.base_dir.join(&speech.model).display());
            Some(gate)
        } else {
            None
        };
        let camera = match &config.camera {
            Some(camera) if motion.enabled => {
                Some(capture::open_camera(camera, &config.base_dir, &devices.camera, &stop)?)
            }
            Some(_) => {
                info!("camera configured but the motion gate is off: not capturing frames");
                None
            }
            None => None,
        };
        let microphone = match &config.microphone {
            Some(microphone) if listening => {
                Some(capture::open_microphone(microphone, &config.base_dir, &devices.microphone, &stop)?)
            }
            Some(_) => {
                info!("microphone configured but the sound and speech gates are off: not capturing audio");
                None
            }
            None => None,
        };

        let frames = camera.map(|mut source| {
            info!("camera: {}", source.describe());
            let mut gate = MotionGate::new(motion);
            let station = config.station.id.clone();
            let lane = Lane {
                names: ["camera", "motion-gate"],
                capacity: config.queues.frames,
                when_full: WhenFull::DropOldest,
                counter: |stats| &stats.frames_captured,
                status: devices.camera.clone(),
            };
            lanes.spawn(
                lane,
                move || source.next_frame(),
                move |frame| {
                    let Some(frame) = frame else { return Vec::new() };
                    if let Some(latest) = &latest_frame {
                        latest.store(frame);
                    }
                    gate.observe(frame, Instant::now())
                        .map(|m| Event::new(&station, EventDetail::Motion(m)))
                        .into_iter()
                        .collect()
                },
            )
        });

        let audio = microphone.map(|mut source| {
            info!("microphone: {}", source.describe());
            let mut sound_gate = sound.enabled.then(|| SoundGate::new(sound));
            let station = config.station.id.clone();
            let lane = Lane {
                names: ["microphone", "audio-gates"],
                capacity: config.queues.audio_chunks,
                when_full: WhenFull::Wait,
                counter: |stats| &stats.audio_chunks_captured,
                status: devices.microphone.clone(),
            };
            lanes.spawn(
                lane,
                move || source.next_chunk(),
                move |chunk| {
                    let mut events = Vec::new();
                    let Some(chunk) = chunk else {
                        // The end of the input: an utterance still open ends here.
                        if let Some(gate) = speech_gate.as_mut() {
                            match gate.flush() {
                                Ok(speech) => {
                                    events.extend(speech.map(|s| Event::new(&station, EventDetail::Speech(s))))
                                }
                                Err(e) => warn!("speech gate: {e}"),
                            }
                        }
                        return events;
                    };
                    if let Some(gate) = sound_gate.as_mut() {
                        events.extend(
                            gate.observe(chunk, Instant::now()).map(|s| Event::new(&station, EventDetail::Sound(s))),
                        );
                    }
                    if let Some(gate) = speech_gate.as_mut() {
                        match gate.observe(chunk) {
                            Ok(speech) => {
                                events.extend(speech.into_iter().map(|s| Event::new(&station, EventDetail::Speech(s))))
                            }
                            Err(e) => warn!("speech gate: chunk {}: {e}", chunk.seq),
                        }
                    }
                    events
                },
            )
        });
        if frames.is_none() && audio.is_none() {
            warn!("no gate is enabled: nothing will be published but the station's status");
        }
        let sources = lanes.sources.into_inner().unwrap_or_default();
        let gate_heartbeats = lanes.gate_heartbeats.into_inner().unwrap_or_default();
        Ok(Self { frames, audio, stats: lanes.stats, gates_done, stop, sources, gate_heartbeats })
    }

    /// The gate threads' heartbeats, by thread name.
    pub fn gate_heartbeats(&self) -> impl Iterator<Item = (&'static str, &Heartbeat)> {
        self.gate_heartbeats.iter().map(|(name, heartbeat)| (*name, heartbeat))
    }

    /// Resolves once every gate has finished: all sources ended, or [`Pipeline::stop`] was called.
    /// With no gate running, it never resolves (the station idles until told to stop).
    pub async fn finished(&mut self) {
        if self.frames.is_none() && self.audio.is_none() {
            std::future::pending::<()>().await;
        }
        while self.gates_done.recv().await.is_some() {}
    }

    /// Stops capture. Gates still process what is queued, then finish; wait with `finished`,
    /// then `sources_stopped`.
    pub fn stop(&self) {
        self.stop.set();
        if let Some(queue) = &self.frames {
            queue.close();
        }
        if let Some(queue) = &self.audio {
            queue.close();
        }
    }

    /// Waits up to `timeout` for the source threads to let go of their devices (a reload opens
    /// them again). False if one is still busy: a camera blocked in a dequeue returns within its
    /// stall timeout, and is left to finish on its own.
    pub async fn sources_stopped(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.sources.retain(|source| !source.is_finished());
            if self.sources.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        let counts = self.counts();
        format!(
            "{} frames captured ({} dropped while the motion gate was busy), {} audio chunks, {} events",
            counts.frames, counts.frames_dropped, counts.audio_chunks, counts.events
        )
    }

    /// What this pipeline has done so far, and what waits in its queues now.
    pub fn counts(&self) -> CaptureCounts {
        CaptureCounts {
            frames: self.stats.frames_captured.load(Ordering::Relaxed),
            frames_dropped: self.frames.as_ref().map_or(0, |q| q.dropped()),
            audio_chunks: self.stats.audio_chunks_captured.load(Ordering::Relaxed),
            events: self.stats.events.load(Ordering::Relaxed),
            frames_queued: self.frames.as_ref().map_or(0, |q| q.len() as u64),
            audio_chunks_queued: self.audio.as_ref().map_or(0, |q| q.len() as u64),
        }
    }
}

/// Capture figures for the log and `<root>/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaptureCounts {
    pub frames: u64,
    /// Dropped while the motion gate was busy.
    pub frames_dropped: u64,
    pub audio_chunks: u64,
    pub events: u64,
    pub frames_queued: u64,
    pub audio_chunks_queued: u64,
}

impl CaptureCounts {
    /// Totals over two pipelines' lives (queue depths are the later one's).
    pub fn then(self, later: CaptureCounts) -> CaptureCounts {
        CaptureCounts {
            frames: self.frames + later.frames,
            frames_dropped: self.frames_dropped + later.frames_dropped,
            audio_chunks: self.audio_chunks + later.audio_chunks,
            events: self.events + later.events,
            frames_queued: later.frames_queued,
            audio_chunks_queued: later.audio_chunks_queued,
        }
    }
}

/// What a source does when its queue is full.
#[derive(Debug, Clone, Copy)]
enum WhenFull {
    DropOldest,
    Wait,
}

/// One lane: a source thread feeding a gate thread through a queue.
struct Lane {
    /// Of the source's thread and the gate's.
    names: [&'static str; 2],
    capacity: usize,
    when_full: WhenFull,
    counter: fn(&PipelineStats) -> &AtomicU64,
    /// Told when the source ends or is given up on.
    status: StatusReporter,
}

/// The utterance's samples are for the model stage; they are not held in the publisher's queue,
/// where a broker outage could pile up hundreds of them.
fn without_audio(event: Event) -> Event {
    match event.detail {
        EventDetail::Speech(speech) => {
            Event { detail: EventDetail::Speech(SpeechEvent { audio: Arc::from([]), ..speech }), ..event }
        }
        _ => event,
    }
}

/// What every lane shares.
struct Lanes {
    stats: Arc<PipelineStats>,
    analysis: Option<Arc<Inbox>>,
    events: mpsc::Sender<Event>,
    /// Each gate thread holds a clone; `gates_done` sees them all dropped.
    gate_alive: mpsc::Sender<()>,
    sources: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    gate_heartbeats: std::sync::Mutex<Vec<(&'static str, Heartbeat)>>,
}

impl Lanes {
    /// Starts a lane's source and gate threads.
    fn spawn<T: Send + 'static>(
        &self,
        lane: Lane,
        mut next: impl FnMut() -> Result<Option<T>, SourceError> + Send + 'static,
        mut gate: impl FnMut(Option<&T>) -> Vec<Event> + Send + 'static,
    ) -> Arc<BoundedQueue<T>> {
        let Lane { names: [source_name, gate_name], capacity, when_full, counter, status } = lane;
        let queue = Arc::new(BoundedQueue::new(capacity));
        let source = spawn_thread(source_name, {
            let (queue, stats) = (Arc::clone(&queue), Arc::clone(&self.stats));
            move || {
                let push = |item| match when_full {
                    WhenFull::DropOldest => queue.push_drop_oldest(item),
                    WhenFull::Wait => queue.push_wait(item),
                };
                let heartbeat = status.heartbeat();
                heartbeat.beat();
                let end = run_source(&mut next, push, &queue, counter(&stats), heartbeat, source_name);
                heartbeat.retire();
                match end {
                    SourceEnd::EndOfInput => status.ended(),
                    SourceEnd::GaveUp(error) => status.gave_up(&error),
                    SourceEnd::Stopped => {}
                }
            }
        });
        if let (Some(source), Ok(mut sources)) = (source, self.sources.lock()) {
            sources.push(source);
        }
        let heartbeat = Heartbeat::default();
        heartbeat.beat();
        if let Ok(mut heartbeats) = self.gate_heartbeats.lock() {
            heartbeats.push((gate_name, heartbeat.clone()));
        }
        spawn_thread(gate_name, {
            let (queue, events, stats, alive) =
                (Arc::clone(&queue), self.events.clone(), Arc::clone(&self.stats), self.gate_alive.clone());
            let analysis = self.analysis.clone();
            move || {
                run_gate(&queue, &events, analysis.as_deref(), &stats, &heartbeat, &mut gate);
                heartbeat.retire();
                drop(alive);
            }
        });
        queue
    }
}

fn spawn_thread(name: &str, body: impl FnOnce() + Send + 'static) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn({
            let name = name.to_owned();
            move || {
                block_service_signals();
                let _stage = tracing::info_span!("stage", stage = name).entered();
                body();
            }
        })
        .map_err(|e| error!("cannot start the {name} thread: {e}"))
        .ok()
}

/// Leaves SIGTERM, SIGINT and SIGHUP to the service's own threads. Delivered to a capture thread,
/// one would interrupt a V4L2 dequeue (EINTR), which the `v4l` crate cannot resume, and the
/// camera would be reset by a reload. (std clears the mask again in a command's child process.)
fn block_service_signals() {
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which fully initialises it;
    // pthread_sigmask only changes the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SourceEnd {
    EndOfInput,
    /// Failed too often in a row; the last error.
    GaveUp(String),
    Stopped,
}

/// Pulls from a source into a queue until the source ends, fails for good, or the queue closes.
/// Live sources retry their devices themselves and end only when stopped.
fn run_source<T>(
    mut next: impl FnMut() -> Result<Option<T>, SourceError>,
    mut push: impl FnMut(T) -> bool,
    queue: &BoundedQueue<T>,
    captured: &AtomicU64,
    heartbeat: &Heartbeat,
    name: &str,
) -> SourceEnd {
    let mut consecutive_errors = 0;
    let mut end = SourceEnd::Stopped;
    while !queue.is_closed() {
        match next() {
            Ok(Some(item)) => {
                heartbeat.beat();
                consecutive_errors = 0;
                captured.fetch_add(1, Ordering::Relaxed);
                if !push(item) {
                    break;
                }
            }
            // A live source returns None when told to stop: that is not the end of its input.
            Ok(None) if queue.is_closed() => break,
            Ok(None) => {
                info!("{name}: end of input");
                end = SourceEnd::EndOfInput;
                break;
            }
            Err(e) => {
                consecutive_errors += 1;
                warn!("{name}: {e}");
                if consecutive_errors >= MAX_CONSECUTIVE_SOURCE_ERRORS {
                    error!("{name}: {consecutive_errors} failures in a row, giving up on this source");
                    end = SourceEnd::GaveUp(e.to_string());
                    break;
                }
            }
        }
    }
    queue.close();
    debug!("{name} source stopped");
    end
}

/// Feeds queued items to a gate and sends what it reports, until the queue is closed and drained;
/// then calls the gate once with `None`.
fn run_gate<T>(
    queue: &BoundedQueue<T>,
    events: &mpsc::Sender<Event>,
    analysis: Option<&Inbox>,
    stats: &PipelineStats,
    heartbeat: &Heartbeat,
    mut gate: impl FnMut(Option<&T>) -> Vec<Event>,
) {
    let send_all = |found: Vec<Event>| {
        for event in found {
            debug!("{} event {}", event.kind(), event.id);
            stats.events.fetch_add(1, Ordering::Relaxed);
            if let Some(inbox) = analysis {
                inbox.offer(&event);
            }
            if !send_event(without_audio(event), events, queue, heartbeat) {
                return false;
            }
        }
        true
    };
    loop {
        heartbeat.beat();
        match queue.pop_timeout(POLL_INTERVAL) {
            Pop::Item(item) => {
                if !send_all(gate(Some(&item))) {
                    queue.close();
                    return;
                }
            }
            Pop::TimedOut => {}
            Pop::Closed => {
                // Input over: a gate holding something back (an utterance in progress) ends it.
                send_all(gate(None));
                return;
            }
        }
    }
}

/// Waits for room in the publisher's queue (full while the broker is unreachable), but not past a
/// stop: a gate that blocked there would hold the daemon up. False when the gate should end.
fn send_event<T>(
    mut event: Event,
    events: &mpsc::Sender<Event>,
    queue: &BoundedQueue<T>,
    heartbeat: &Heartbeat,
) -> bool {
    loop {
        match events.try_send(event) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Full(held)) if !queue.is_closed() => {
                event = held;
                heartbeat.beat();
                std::thread::sleep(SEND_RETRY_INTERVAL);
            }
            Err(mpsc::error::TrySendError::Full(held)) => {
                warn!(
                    "stopping with the event queue full (broker unreachable): {} event {} is lost",
                    held.kind(),
                    held.id
                );
                return true;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                warn!("publisher has stopped; gate stopping");
                return false;
            }
        }
    }
}
