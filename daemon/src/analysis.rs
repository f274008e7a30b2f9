//! The model stage: gate events in; scene reports, alerts and tool calls out.
//!
//! ```text
//! gate threads ──offer(Event)──▶ Inbox (one pending look; commands queued) ──▶ analyzer thread
//!                                                                                │ Model::answer
//! camera lane ──LatestFrame──────────────────────────────────────────────────────┘
//!   analyzer ──mpsc<AnalysisOutput>──▶ service ──▶ publisher (report, alert, tool/<name>, replies)
//! ```
//! One look per activity: a trigger of a kind that started a look less than `cooldown_secs` ago
//! is ignored, and while the model is busy a newer trigger replaces an older one still waiting.
//! The model is loaded once per process; pipelines (reloads, pause) come and go around it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::capture::Frame;
use crate::command::{Command, CommandReply, CommandRequest, ToolResult};
use crate::supervision::Heartbeat;
use base64::Engine;

use crate::config::{AlertRule, AnalysisConfig, Config, ThumbnailsConfig};
use crate::event::{Event, EventDetail};
use crate::model::{Model, ModelError, Part, Question, Role, Sampling, ToolCall, ToolSet, Turn};
use crate::outbox::{Priority, PRIORITY_ACTION, PRIORITY_EVENT, PRIORITY_REPORT};
use crate::report::{ModelIdentity, ReportTiming, SceneObservation, SceneReport, Trigger, TriggerKind};

/// Commands waiting for the model; more are refused as busy.
const MAX_QUEUED_COMMANDS: usize = 4;
/// The longest answer to an `ask` command, in tokens.
const ASK_MAX_TOKENS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("cannot load the model bundle {path}: {source}")]
    Load { path: String, source: ModelError },
    #[error("cannot read the documents in {path}: {source}")]
    Documents { path: String, source: std::io::Error },
    #[error("cannot start the analyzer thread: {0}")]
    Thread(std::io::Error),
    #[error("[[tools]]: {0}")]
    Tools(#[from] crate::model::ToolError),
}

/// Something to publish under the station's root, kept in the outbox until the broker has it.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    /// `report`, `alert` or `tool/<name>`.
    pub subtopic: String,
    pub payload: String,
    pub priority: Priority,
    /// For the log: what this is and its id.
    pub label: String,
    /// When the look that made it was asked for: the capture of the frame or chunk whose gate
    /// fired, or the moment of a schedule's tick or a command. The publisher times deliveries
    /// from here.
    pub asked_at: SystemTime,
}

/// What the analyzer hands to the service.
#[derive(Debug)]
pub enum AnalysisOutput {
    Publish(Publication),
    Reply(CommandReply),
}

/// The newest frame the camera lane has seen, for looks that a sound or a command started.
#[derive(Debug, Clone, Default)]
pub struct LatestFrame(Arc<Mutex<Option<Frame>>>);

impl LatestFrame {
    pub fn store(&self, frame: &Frame) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(frame.clone());
    }

    fn get(&self) -> Option<Frame> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// One look to take.
#[derive(Debug, Clone)]
struct Look {
    trigger: Trigger,
    /// When what triggered it was captured.
    captured_at: SystemTime,
    frame: Option<Frame>,
    /// An utterance, 16 kHz mono.
    speech: Option<Arc<[i16]>>,
    /// A command's request: `ask` carries its question; the reply goes to the caller.
    command: Option<CommandRequest>,
    /// A tool's answer to a call the model made: the conversation of that call goes on.
    tool_result: Option<ToolResult>,
    /// Where the motion that started it was: `(x, y, width, height)` in fractions of the frame.
    motion: Option<(f64, f64, f64, f64)>,
}

impl Look {
    /// A look triggered now by `kind`, at `frame`.
    fn now(kind: TriggerKind, event_id: Option<Uuid>, frame: Option<Frame>) -> Self {
        Self {
            trigger: Trigger { kind, event_id },
            captured_at: SystemTime::now(),
            frame,
            speech: None,
            command: None,
            tool_result: None,
            motion: None,
        }
    }
}

#[derive(Default)]
struct InboxState {
    pending: Option<Look>,
    commands: std::collections::VecDeque<Look>,
    last_look: Vec<(TriggerKind, Instant)>,
    closed: bool,
}

/// Where gates and commands leave looks for the analyzer thread.
pub struct Inbox {
    triggers: Vec<TriggerKind>,
    cooldown: Duration,
    latest_frame: LatestFrame,
    state: Mutex<InboxState>,
    ready: Condvar,
}

impl Inbox {
    /// A gate event: a look, if its kind triggers one and is not cooling down.
    pub fn offer(&self, event: &Event) {
        let motion = match &event.detail {
            EventDetail::Motion(m) if m.frame_width > 0 && m.frame_height > 0 => {
                let (w, h) = (f64::from(m.frame_width), f64::from(m.frame_height));
                let r = m.region;
                Some((f64::from(r.x) / w, f64::from(r.y) / h, f64::from(r.width) / w, f64::from(r.height) / h))
            }
            _ => None,
        };
        let (kind, speech) = match &event.detail {
            EventDetail::Motion(_) => (TriggerKind::Motion, None),
            EventDetail::Sound(_) => (TriggerKind::Sound, None),
            EventDetail::Speech(speech) => (TriggerKind::Speech, Some(Arc::clone(&speech.audio))),
        };
        if !self.triggers.contains(&kind) {
            return;
        }
        let now = Instant::now();
        let mut state = self.lock();
        if state.closed || state.last_look.iter().any(|&(k, at)| k == kind && now.duration_since(at) < self.cooldown) {
            return;
        }
        state.last_look.retain(|&(k, _)| k != kind);
        state.last_look.push((kind, now));
        let captured_at = humantime::parse_rfc3339(&event.timestamp).unwrap_or_else(|_| SystemTime::now());
        let look = Look { captured_at, speech, motion, ..Look::now(kind, Some(event.id), self.latest_frame.get()) };
        if let Some(replaced) = state.pending.replace(look) {
            debug!("a newer {kind:?} trigger replaces a waiting {:?} one", replaced.trigger.kind);
        }
        drop(state);
        self.ready.notify_one();
    }

    /// A look on a schedule.
    fn offer_scheduled(&self) {
        let mut state = self.lock();
        if state.pending.is_none() && !state.closed {
            state.pending = Some(Look::now(TriggerKind::Schedule, None, self.latest_frame.get()));
            drop(state);
            self.ready.notify_one();
        }
    }

    /// A `capture-now` or `ask` command; false when too many are waiting.
    pub fn command(&self, request: CommandRequest) -> bool {
        let look = Look { command: Some(request), ..Look::now(TriggerKind::Command, None, self.latest_frame.get()) };
        self.queue_first(look)
    }

    /// A tool's result, queued with the commands; false when too many are waiting.
    pub fn tool_result(&self, result: ToolResult) -> bool {
        let look = Look::now(TriggerKind::ToolResult, Some(result.call_id), None);
        self.queue_first(Look { tool_result: Some(result), ..look })
    }

    /// Queues a look ahead of the gates' (commands and results); false when too many wait.
    fn queue_first(&self, look: Look) -> bool {
        let mut state = self.lock();
        if state.closed || state.commands.len() >= MAX_QUEUED_COMMANDS {
            return false;
        }
        state.commands.push_back(look);
        drop(state);
        self.ready.notify_one();
        true
    }

    pub fn latest_frame(&self) -> &LatestFrame {
        &self.latest_frame
    }

    /// Waits up to `timeout` for a look, commands first; `Err(())` once closed.
    fn take(&self, timeout: Duration) -> Result<Option<Look>, ()> {
        let state = self.lock();
        let (mut state, _) = self
            .ready
            .wait_timeout_while(state, timeout, |s| !s.closed && s.pending.is_none() && s.commands.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return Err(());
        }
        Ok(state.commands.pop_front().or_else(|| state.pending.take()))
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The model stage's figures for `<root>/stats`.
#[derive(Debug, Default)]
pub struct AnalysisGauges {
    /// Beaten between looks and at each token of one: silence means the model is stuck.
    heartbeat: Heartbeat,
    looks: AtomicU64,
    failures: AtomicU64,
    last_look_ms: AtomicU64,
    total_look_ms: AtomicU64,
}

/// A snapshot of [`AnalysisGauges`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AnalysisFigures {
    /// Looks that gave a report.
    pub looks: u64,
    /// Looks the model failed or could not finish.
    pub failures: u64,
    pub last_look_ms: u64,
    pub mean_look_ms: u64,
}

impl AnalysisGauges {
    fn look_done(&self, total_ms: u64) {
        let looks = self.looks.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.total_look_ms.fetch_add(total_ms, Ordering::Relaxed) + total_ms;
        self.last_look_ms.store(total_ms, Ordering::Relaxed);
        debug!("{looks} looks, {total} ms in all");
    }

    pub fn snapshot(&self) -> AnalysisFigures {
        let looks = self.looks.load(Ordering::Relaxed);
        AnalysisFigures {
            looks,
            failures: self.failures.load(Ordering::Relaxed),
            last_look_ms: self.last_look_ms.load(Ordering::Relaxed),
            mean_look_ms: self.total_look_ms.load(Ordering::Relaxed).checked_div(looks).unwrap_or(0),
        }
    }
}

/// The running model stage.
pub struct Analyzer {
    inbox: Arc<Inbox>,
    gauges: Arc<AnalysisGauges>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Analyzer {
    /// Loads the model of `config` and starts the analyzer thread; what it makes goes to `out`.
    pub fn start(config: &Config, out: mpsc::Sender<AnalysisOutput>) -> Result<Option<Self>, AnalysisError> {
        let Some(model_config) = &config.model else { return Ok(None) };
        let bundle = config.resolve_path(&model_config.bundle);
        crate::model::use_threads(model_config.thread_count());
        let started = Instant::now();
        let model = Model::load_with(&bundle, model_config.encoders)
            .map_err(|source| AnalysisError::Load { path: bundle.display().to_string(), source })?;
        info!("model {} loaded in {:.1?}", model.bundle.manifest.name, started.elapsed());
        let tools = if config.tools.is_empty() { None } else { Some(ToolSet::new(config.tools.clone())?) };
        let documents = match &config.analysis.documents {
            Some(dir) => read_documents(&config.resolve_path(dir), &model, config.analysis.documents_max_tokens)?,
            None => String::new(),
        };
        let inbox = Arc::new(Inbox {
            triggers: config.analysis.triggers.clone(),
            cooldown: Duration::from_secs_f64(config.analysis.cooldown_secs),
            latest_frame: LatestFrame::default(),
            state: Mutex::new(InboxState::default()),
            ready: Condvar::new(),
        });
        let gauges = Arc::new(AnalysisGauges::default());
        let worker = Worker {
            gauges: Arc::clone(&gauges),
            thumbnails: config.thumbnails.enabled.then(|| config.thumbnails.clone()),
            station: config.station.id.clone(),
            analysis: config.analysis.clone(),
            system: system_prompt(&config.analysis, &documents),
            identity: ModelIdentity {
                bundle: model.bundle.manifest.name.clone(),
                manifest_sha256: model.manifest_sha256().to_owned(),
            },
            model,
            tools,
            alerts: config.alerts.iter().cloned().map(AlertState::new).collect(),
            calls: std::collections::VecDeque::new(),
            out,
        };
        let schedule =
            (config.analysis.schedule_secs > 0.0).then(|| Duration::from_secs_f64(config.analysis.schedule_secs));
        let thread_inbox = Arc::clone(&inbox);
        let thread = std::thread::Builder::new()
            .name("analyzer".into())
            .spawn(move || {
                let _stage = tracing::info_span!("stage", stage = "analyzer").entered();
                worker.run(&thread_inbox, schedule)
            })
            .map_err(AnalysisError::Thread)?;
        Ok(Some(Self { inbox, gauges, thread: Some(thread) }))
    }

    pub fn inbox(&self) -> Arc<Inbox> {
        Arc::clone(&self.inbox)
    }

    pub fn figures(&self) -> AnalysisFigures {
        self.gauges.snapshot()
    }

    pub fn heartbeat(&self) -> &Heartbeat {
        &self.gauges.heartbeat
    }

    /// Ends the thread after the look in progress, if any.
    pub fn stop(mut self) {
        self.inbox.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    gauges: Arc<AnalysisGauges>,
    thumbnails: Option<ThumbnailsConfig>,
    station: String,
    analysis: AnalysisConfig,
    system: String,
    identity: ModelIdentity,
    model: Model,
    tools: Option<ToolSet>,
    alerts: Vec<AlertState>,
    /// Calls published and waiting for their results, oldest first.
    calls: std::collections::VecDeque<PendingCall>,
    out: mpsc::Sender<AnalysisOutput>,
}

/// A call the model made, kept until its result comes back, so the conversation can go on.
struct PendingCall {
    id: Uuid,
    /// The user turn that asked for it.
    request: String,
    call: ToolCall,
    captured_at: SystemTime,
}

/// Calls kept waiting for a result; the oldest is forgotten past this.
const MAX_PENDING_CALLS: usize = 16;

impl Worker {
    fn run(self, inbox: &Inbox, schedule: Option<Duration>) {
        let heartbeat = self.gauges.heartbeat.clone();
        self.serve(inbox, schedule);
        heartbeat.retire();
    }

    fn serve(mut self, inbox: &Inbox, schedule: Option<Duration>) {
        // Waiting for work beats the heartbeat this often.
        const BEAT_EVERY: Duration = Duration::from_secs(1);
        let mut next_scheduled = schedule.map(|every| Instant::now() + every);
        loop {
            self.gauges.heartbeat.beat();
            let wait = next_scheduled.map_or(BEAT_EVERY, |at| at.saturating_duration_since(Instant::now()));
            let look = match inbox.take(wait.min(BEAT_EVERY)) {
                Ok(Some(look)) => look,
                Ok(None) => {
                    if let (Some(at), Some(every)) = (next_scheduled, schedule) {
                        if Instant::now() >= at {
                            next_scheduled = Some(Instant::now() + every);
                            inbox.offer_scheduled();
                        }
                    }
                    continue;
                }
                Err(()) => return,
            };
            // The journal gets the id of what started the look with each of its lines.
            let _look =
                tracing::info_span!("look", event_id = look.trigger.event_id.map(tracing::field::display)).entered();
            let outputs = match (look.command.as_ref().map(|c| &c.command), &look.tool_result) {
                (Some(Command::Ask { question }), _) => self.ask(&look, question),
                (_, Some(result)) => self.continue_after(&look, result),
                _ => self.report(&look, None),
            };
            for output in outputs {
                if self.out.blocking_send(output).is_err() {
                    return;
                }
            }
        }
    }

    /// The conversation of a call goes on with the tool's response: a new report.
    fn continue_after(&mut self, look: &Look, result: &ToolResult) -> Vec<AnalysisOutput> {
        let Some(index) = self.calls.iter().position(|c| c.id == result.call_id && c.call.name.as_str() == result.tool)
        else {
            let why = format!("no call {} of `{}` is waiting for a result", result.call_id, result.tool);
            return vec![AnalysisOutput::Reply(result.reply(false, why))];
        };
        let Some(pending) = self.calls.remove(index) else { return Vec::new() };
        let history = vec![
            Turn::text(Role::User, pending.request),
            Turn {
                role: Role::Model,
                parts: vec![
                    Part::ToolCall(pending.call.clone()),
                    Part::ToolResponse { name: pending.call.name.clone(), response: result.response.clone() },
                ],
            },
        ];
        let look = Look { captured_at: pending.captured_at, ..look.clone() };
        let mut outputs = self.report(&look, Some(history));
        let published = outputs.iter().find_map(|o| match o {
            AnalysisOutput::Publish(p) if p.subtopic == "report" => Some(p.label.clone()),
            _ => None,
        });
        outputs.push(AnalysisOutput::Reply(match published {
            Some(label) => result.reply(true, format!("{label} published")),
            None => result.reply(false, "the model could not make a report of the answer"),
        }));
        outputs
    }

    /// A scene report, the alerts it raises and, when it is severe enough, a tool call. After a
    /// tool's result, `history` holds the call and its response.
    fn report(&mut self, look: &Look, history: Option<Vec<Turn>>) -> Vec<AnalysisOutput> {
        let mut outputs = Vec::new();
        let task = match history {
            Some(_) => "The tool has answered. Describe the scene again, taking its answer into account.",
            None => "Describe the scene now.",
        };
        let question = self.question(look, task.into(), self.analysis.max_tokens);
        let question = Question {
            constraint: Some(SceneObservation::grammar()),
            history: history.unwrap_or_default(),
            ..question
        };
        let reply_failed = |why: String| {
            look.command
                .as_ref()
                .map(|c| AnalysisOutput::Reply(CommandReply::failed(c.command.name(), c.id.clone(), why)))
        };
        let answer = match self.model.answer(&question, |_| self.gauges.heartbeat.beat()) {
            Ok(answer) => answer,
            Err(e) => {
                self.gauges.failures.fetch_add(1, Ordering::Relaxed);
                warn!("the model failed on a {:?} look: {e}", look.trigger.kind);
                return reply_failed(format!("the model failed: {e}")).into_iter().collect();
            }
        };
        let observation: SceneObservation = match serde_json::from_str(&answer.text) {
            Ok(observation) => observation,
            Err(e) => {
                self.gauges.failures.fetch_add(1, Ordering::Relaxed);
                // Constrained decoding makes this a model that ran out of tokens mid-object.
                warn!("the model's answer is not a complete report ({e}): {}", answer.text);
                return reply_failed(format!("the model's answer was cut short: {e}")).into_iter().collect();
            }
        };
        let report = SceneReport::new(
            &self.station,
            look.captured_at,
            look.trigger.clone(),
            observation,
            ReportTiming::of(&answer),
            self.identity.clone(),
        );
        self.gauges.look_done(report.timing.total_ms);
        info!(
            "report {} (severity {}, {} ms): {}",
            report.id, report.observation.severity, report.timing.total_ms, report.observation.summary
        );
        outputs.push(AnalysisOutput::Publish(Publication {
            subtopic: "report".into(),
            payload: report.to_json(),
            priority: PRIORITY_REPORT + report.observation.severity.min(3),
            label: format!("report {}", report.id),
            asked_at: look.captured_at,
        }));
        if let (Some(settings), Some(frame)) = (&self.thumbnails, &look.frame) {
            match thumbnail(&frame.image, settings) {
                Ok(jpeg) => outputs.push(AnalysisOutput::Publish(Publication {
                    subtopic: "thumbnail".into(),
                    payload: base64::engine::general_purpose::STANDARD.encode(jpeg),
                    priority: PRIORITY_EVENT,
                    label: format!("thumbnail of report {}", report.id),
                    asked_at: look.captured_at,
                })),
                Err(e) => warn!("cannot make the thumbnail of report {}: {e}", report.id),
            }
        }
        let now = Instant::now();
        for alert in self.alerts.iter_mut().filter_map(|rule| rule.check(&report, look.motion, now)) {
            info!("alert `{}` raised by report {}", alert.rule, report.id);
            outputs.push(AnalysisOutput::Publish(Publication {
                subtopic: "alert".into(),
                payload: serde_json::to_string(&alert).unwrap_or_default(),
                priority: PRIORITY_ACTION,
                label: format!("alert {}", alert.id),
                asked_at: look.captured_at,
            }));
        }
        if report.observation.severity >= self.analysis.tool_min_severity && look.tool_result.is_none() {
            outputs.extend(self.tool_call(look, &report));
        }
        if let Some(command) = &look.command {
            outputs.push(AnalysisOutput::Reply(CommandReply::done(command, format!("report {} published", report.id))));
        }
        outputs
    }

    /// Asks the model to call one of the declared tools about `report`.
    fn tool_call(&mut self, look: &Look, report: &SceneReport) -> Option<AnalysisOutput> {
        let tools = self.tools.as_ref()?;
        let prompt = format!(
            "This scene report was just made:\n{}\nCall the one tool that best answers it.",
            serde_json::to_string(&report.observation).unwrap_or_default()
        );
        let question = Question {
            tools: Some(tools.clone()),
            constraint: Some(tools.call_grammar()),
            image: None,
            audio: None,
            ..self.question(look, prompt.clone(), self.analysis.max_tokens)
        };
        let answer = match self.model.answer(&question, |_| self.gauges.heartbeat.beat()) {
            Ok(answer) => answer,
            Err(e) => {
                warn!("the model failed on a tool call for report {}: {e}", report.id);
                return None;
            }
        };
        let call = match tools.parse_call(&answer.raw_text) {
            Ok(call) => call,
            Err(e) => {
                warn!("the model's tool call for report {} is not usable: {e}", report.id);
                return None;
            }
        };
        let published = PublishedToolCall::new(&self.station, report, &call, tools);
        info!("tool call {} `{}` for report {}", published.id, call.name.as_str(), report.id);
        if self.calls.len() >= MAX_PENDING_CALLS {
            self.calls.pop_front();
        }
        self.calls.push_back(PendingCall {
            id: published.id,
            request: question.prompt.clone(),
            call: call.clone(),
            captured_at: look.captured_at,
        });
        Some(AnalysisOutput::Publish(Publication {
            subtopic: format!("tool/{}", call.name),
            payload: serde_json::to_string(&published).unwrap_or_default(),
            priority: PRIORITY_ACTION,
            label: format!("tool call {}", published.id),
            asked_at: look.captured_at,
        }))
    }

    /// A free answer to a person's question about the scene.
    fn ask(&self, look: &Look, question_text: &str) -> Vec<AnalysisOutput> {
        let Some(command) = &look.command else { return Vec::new() };
        let question = self.question(look, question_text.to_owned(), ASK_MAX_TOKENS);
        let reply = match self.model.answer(&question, |_| self.gauges.heartbeat.beat()) {
            Ok(answer) => CommandReply::done(command, answer.text.trim()),
            Err(e) => {
                CommandReply::failed(command.command.name(), command.id.clone(), format!("the model failed: {e}"))
            }
        };
        vec![AnalysisOutput::Reply(reply)]
    }

    /// The question for `look`: its picture and speech where the model takes them, the station's
    /// context in the system turn, and `task`.
    fn question(&self, look: &Look, task: String, max_tokens: usize) -> Question {
        let manifest = &self.model.bundle.manifest;
        let sees = manifest.instruction_tuned && manifest.files.contains_key("vision");
        let hears = manifest.instruction_tuned && manifest.files.contains_key("audio");
        let image = look.frame.as_ref().filter(|_| sees).map(|f| ((*f.image).clone(), self.analysis.image_tokens));
        let audio = look
            .speech
            .as_ref()
            .filter(|_| hears)
            .map(|samples| samples.iter().map(|&s| f32::from(s) / 32768.0).collect());
        let what = match look.trigger.kind {
            TriggerKind::Motion => "The motion detector fired.",
            TriggerKind::Sound => "The microphone heard a loud sound.",
            TriggerKind::Speech => "Someone spoke; the recording is attached.",
            TriggerKind::Schedule => "This is a routine look.",
            TriggerKind::Command => "An operator asked for this look.",
            TriggerKind::ToolResult => "A tool answered the call you made.",
        };
        let at = humantime::format_rfc3339_seconds(look.captured_at);
        Question {
            prompt: format!("{what} Time: {at}.\n{task}"),
            image,
            audio,
            max_tokens,
            sampling: Sampling::Greedy,
            system: Some(self.system.clone()),
            tools: None,
            constraint: None,
            history: Vec::new(),
        }
    }
}

/// The frame, `settings.width` wide at most, as a JPEG.
fn thumbnail(frame: &image::RgbImage, settings: &ThumbnailsConfig) -> Result<Vec<u8>, image::ImageError> {
    let small;
    let picture = if frame.width() > settings.width {
        let height = (u64::from(frame.height()) * u64::from(settings.width) / u64::from(frame.width())).max(1) as u32;
        small = image::imageops::resize(frame, settings.width, height, image::imageops::FilterType::Triangle);
        &small
    } else {
        frame
    };
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, settings.quality).encode_image(picture)?;
    Ok(jpeg)
}

/// The system turn: who the model is here, what matters, local documents, the report's fields.
fn system_prompt(analysis: &AnalysisConfig, documents: &str) -> String {
    let mut system = format!(
        "You are the eyes and ears of an unattended sentinel station at {}. What matters here: {}. \
         Write in the language `{}`. Report only what you see and hear.\n",
        analysis.place, analysis.focus, analysis.language
    );
    if !documents.is_empty() {
        system.push_str("\nStation documents:\n");
        system.push_str(documents);
        system.push('\n');
    }
    system.push('\n');
    system.push_str(&SceneObservation::instructions());
    system
}

/// The `.txt` and `.md` files of `dir` in name order, whole, as long as they fit `max_tokens`.
fn read_documents(dir: &Path, model: &Model, max_tokens: usize) -> Result<String, AnalysisError> {
    let read_error = |source| AnalysisError::Documents { path: dir.display().to_string(), source };
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(read_error)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt" || e == "md"))
        .collect();
    paths.sort();
    let mut text = String::new();
    let mut used = 0;
    for path in paths {
        let body = std::fs::read_to_string(&path).map_err(read_error)?;
        let piece = format!("## {}\n{}\n", path.file_name().unwrap_or_default().to_string_lossy(), body.trim());
        let tokens = model.tokenizer().encode(&piece).map(|ids| ids.len()).unwrap_or(usize::MAX);
        if used + tokens > max_tokens {
            warn!("{}: left out of the prompt, past documents_max_tokens ({max_tokens})", path.display());
            continue;
        }
        used += tokens;
        text.push_str(&piece);
    }
    info!("{used} tokens of station documents from {}", dir.display());
    Ok(text)
}

/// The payload of `<root>/alert`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// UUIDv7: unique, time-ordered, stable across redelivery.
    pub id: Uuid,
    pub station: String,
    /// The report's capture time.
    pub timestamp: String,
    /// The rule's name.
    pub rule: String,
    /// The rule's zone the motion was in, when the rule has zones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub severity: u8,
    pub summary: String,
    pub labels: Vec<String>,
    pub people: u8,
    pub vehicles: u8,
    pub hazards: u8,
    pub report_id: Uuid,
}

/// A rule and whether its activity is still going on.
struct AlertState {
    rule: AlertRule,
    /// When a report last matched, while the activity lasts.
    active_since_match: Option<Instant>,
}

impl AlertState {
    fn new(rule: AlertRule) -> Self {
        Self { rule, active_since_match: None }
    }

    /// The alert `report` raises, unless it continues an activity already alerted.
    fn check(&mut self, report: &SceneReport, motion: Option<(f64, f64, f64, f64)>, now: Instant) -> Option<Alert> {
        let zone = match (&self.rule.zones[..], motion) {
            ([], _) => Ok(None),
            (zones, Some((x, y, w, h))) => {
                zones.iter().find(|zone| zone.overlaps(x, y, w, h)).map(|zone| Some(zone.name.clone())).ok_or(())
            }
            (_, None) => Err(()),
        };
        let Ok(zone) = zone.and_then(|zone| if matches(&self.rule, &report.observation) { Ok(zone) } else { Err(()) })
        else {
            self.active_since_match = None;
            return None;
        };
        let rearm = Duration::from_secs_f64(self.rule.rearm_secs);
        let continuing = self.active_since_match.is_some_and(|last| now.duration_since(last) < rearm);
        self.active_since_match = Some(now);
        if continuing {
            debug!("alert `{}`: report {} continues an activity already alerted", self.rule.name, report.id);
            return None;
        }
        let o = &report.observation;
        Some(Alert {
            id: Uuid::now_v7(),
            station: report.station.clone(),
            timestamp: report.timestamp.clone(),
            rule: self.rule.name.clone(),
            zone,
            severity: o.severity,
            summary: o.summary.clone(),
            labels: o.labels.clone(),
            people: o.people,
            vehicles: o.vehicles,
            hazards: o.hazards,
            report_id: report.id,
        })
    }
}

/// Whether every condition of `rule` holds for `observation`.
pub fn matches(rule: &AlertRule, observation: &SceneObservation) -> bool {
    observation.severity >= rule.min_severity
        && observation.people >= rule.min_people
        && observation.vehicles >= rule.min_vehicles
        && observation.hazards >= rule.min_hazards
        && (rule.labels_any.is_empty() || rule.labels_any.iter().any(|l| observation.labels.contains(l)))
}

/// The payload of `<root>/tool/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PublishedToolCall {
    /// The correlation id: a result names it.
    pub id: Uuid,
    pub station: String,
    pub timestamp: String,
    pub tool: String,
    pub arguments: serde_json::Map<String, serde_json::Value>,
    /// A person must confirm before the call is carried out.
    pub confirm: bool,
    pub report_id: Uuid,
}

impl PublishedToolCall {
    fn new(station: &str, report: &SceneReport, call: &ToolCall, tools: &ToolSet) -> Self {
        Self {
            id: Uuid::now_v7(),
            station: station.to_owned(),
            timestamp: report.timestamp.clone(),
            tool: call.name.as_str().to_owned(),
            arguments: call.arguments.clone(),
            confirm: tools.get(call.name.as_str()).is_some_and(|t| t.confirm),
            report_id: report.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation(severity: u8, labels: &[&str], people: u8) -> SceneObservation {
        SceneObservation {
            summary: "test".into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            people,
            vehicles: 0,
            hazards: 0,
            severity,
            confidence: 0.9,
            language: "en".into(),
        }
    }

    fn report(observation: SceneObservation) -> SceneReport {
        SceneReport::new(
            "t",
            SystemTime::now(),
            Trigger { kind: TriggerKind::Motion, event_id: None },
            observation,
            ReportTiming { encode_ms: 0, first_token_ms: 0, total_ms: 0, prompt_tokens: 0, generated_tokens: 0 },
            ModelIdentity { bundle: "b".into(), manifest_sha256: "0".repeat(64) },
        )
    }

    fn rule() -> AlertRule {
        AlertRule {
            name: "fire".into(),
            min_severity: 2,
            labels_any: vec!["fire".into(), "smoke".into()],
            min_people: 0,
            min_vehicles: 0,
            min_hazards: 0,
            rearm_secs: 60.0,
            zones: Vec::new(),
        }
    }

    #[test]
    fn a_rule_with_zones_needs_motion_inside_one() {
        let gate = crate::config::Zone { name: "gate".into(), x: 0.5, y: 0.0, width: 0.5, height: 0.5 };
        let mut state = AlertState::new(AlertRule { zones: vec![gate], ..rule() });
        let fire = report(observation(3, &["fire"], 0));
        let now = Instant::now();
        assert!(state.check(&fire, Some((0.0, 0.6, 0.2, 0.2)), now).is_none(), "motion outside the zone");
        assert!(state.check(&fire, None, now).is_none(), "no motion: a sound or a command started the look");
        let alert = state.check(&fire, Some((0.4, 0.1, 0.2, 0.2)), now).unwrap();
        assert_eq!(alert.zone.as_deref(), Some("gate"));
    }

    #[test]
    fn every_condition_of_a_rule_must_hold() {
        assert!(matches(&rule(), &observation(2, &["smoke"], 0)));
        assert!(!matches(&rule(), &observation(1, &["smoke"], 0)), "not severe enough");
        assert!(!matches(&rule(), &observation(3, &["person"], 0)), "no listed label");
        let crowd = AlertRule { labels_any: vec![], min_people: 5, min_severity: 0, ..rule() };
        assert!(matches(&crowd, &observation(0, &[], 7)));
        assert!(!matches(&crowd, &observation(3, &[], 4)));
    }

    #[test]
    fn an_alert_is_raised_once_per_activity() {
        let mut state = AlertState::new(rule());
        let start = Instant::now();
        let fire = observation(3, &["fire"], 0);
        assert!(state.check(&report(fire.clone()), None, start).is_some());
        assert!(state.check(&report(fire.clone()), None, start + Duration::from_secs(30)).is_none(), "same activity");
        assert!(state.check(&report(fire.clone()), None, start + Duration::from_secs(80)).is_none(), "still going");
        // A gap past rearm_secs, or a report that no longer matches, ends the activity.
        assert!(state.check(&report(fire.clone()), None, start + Duration::from_secs(200)).is_some());
        assert!(state.check(&report(observation(0, &[], 0)), None, start + Duration::from_secs(201)).is_none());
        let alert = state.check(&report(fire), None, start + Duration::from_secs(202)).unwrap();
        assert_eq!((alert.rule.as_str(), alert.severity), ("fire", 3));
    }
}
