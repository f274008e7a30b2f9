//! The daemon's life: start the stages, react to signals, reload the config, stop cleanly.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::analysis::{AnalysisError, AnalysisFigures, AnalysisOutput, Analyzer};
use crate::command::{Command, CommandReply, CommandRequest, Inbound};
use crate::config::{self, Config};
use crate::pipeline::{CaptureCounts, Pipeline, PipelineError};
use crate::publish::{self, PublisherFigures, PublisherHandle, PublisherReport};
use crate::supervision::{self, ServiceManager};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot listen for signals: {0}")]
    Signals(std::io::Error),
    #[error("cannot start capture: {0}")]
    Capture(#[from] PipelineError),
    #[error("the publisher task failed: {0}")]
    Publisher(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Publish(#[from] crate::publish::PublishError),
    #[error("cannot start the model stage: {0}")]
    Analysis(#[from] AnalysisError),
}

/// How the daemon runs.
#[derive(Debug, Clone, Default)]
pub struct ServiceOptions {
    /// The file to read again on SIGHUP; `None` for a config built in code (the demo).
    pub config_path: Option<PathBuf>,
    /// Print each message to stdout once the broker has acknowledged it.
    pub echo: bool,
}

/// Why the main loop woke up.
enum Wake {
    Stop(&'static str),
    Reload,
    SourcesEnded,
    Inbound(Inbound),
    Analysis(AnalysisOutput),
    Stats,
    Supervise,
}

/// What runs: the config in force, its publisher, and its capture (none while paused).
struct Station {
    config: Config,
    options: ServiceOptions,
    publisher: PublisherHandle,
    commands: Option<mpsc::Receiver<Inbound>>,
    pipeline: Option<Pipeline>,
    /// The model stage, with `[model]`; it outlives pipelines (the model loads once).
    analyzer: Option<Analyzer>,
    analysis_tx: mpsc::Sender<AnalysisOutput>,
    /// Capture figures of the pipelines stopped so far.
    earlier_counts: CaptureCounts,
    started: Instant,
    /// systemd, when it started the daemon: readiness, status and the watchdog.
    manager: ServiceManager,
}

/// Runs until SIGTERM or SIGINT, or until every source has ended; then flushes what is queued,
/// publishes `stopped` and returns.
pub async fn run(config: Config, options: ServiceOptions) -> Result<PublisherReport, ServiceError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServiceError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServiceError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(ServiceError::Signals)?;

    info!("station `{}` publishing under {}/", config.station.id, config.topic_root());
    let mut publisher = publish::spawn(&config, options.echo)?;
    let commands = publisher.take_commands();
    let (analysis_tx, mut analysis_rx) = mpsc::channel(ANALYSIS_QUEUE);
    let started = Analyzer::start(&config, analysis_tx.clone()).map_err(ServiceError::from).and_then(|analyzer| {
        let inbox = analyzer.as_ref().map(Analyzer::inbox);
        match Pipeline::start(&config, publisher.events(), &publisher.devices(), inbox) {
            Ok(pipeline) => Ok((analyzer, pipeline)),
            Err(e) => {
                if let Some(analyzer) = analyzer {
                    analyzer.stop();
                }
                Err(e.into())
            }
        }
    });
    let (analyzer, pipeline) = match started {
        Ok(started) => started,
        Err(e) => {
            publisher.stop().await?;
            return Err(e);
        }
    };
    let mut station = Station {
        config,
        options,
        publisher,
        commands,
        pipeline: Some(pipeline),
        analyzer,
        analysis_tx,
        earlier_counts: CaptureCounts::default(),
        started: Instant::now(),
        manager: ServiceManager::from_env(),
    };
    let mut stats_timer = stats_timer(&station.config);
    let mut supervise_timer = station.manager.is_listening().then(|| {
        let every = station.manager.watchdog_interval().unwrap_or(STATUS_EVERY).min(STARTUP_CHECK_EVERY);
        tokio::time::interval(every)
    });

    loop {
        let wake = tokio::select! {
            _ = sigterm.recv() => Wake::Stop("SIGTERM"),
            _ = sigint.recv() => Wake::Stop("SIGINT"),
            _ = sighup.recv() => Wake::Reload,
            () = finished(&mut station.pipeline) => Wake::SourcesEnded,
            Some(inbound) = next_command(&mut station.commands) => Wake::Inbound(inbound),
            Some(output) = analysis_rx.recv() => Wake::Analysis(output),
            _ = tick(stats_timer.as_mut().map(|(_, interval)| interval)) => Wake::Stats,
            _ = tick(supervise_timer.as_mut()) => Wake::Supervise,
        };
        match wake {
            Wake::Stop(signal) => {
                info!("{signal}: stopping");
                station.manager.stopping();
                break;
            }
            Wake::SourcesEnded => {
                info!("every source has ended: stopping");
                station.manager.stopping();
                break;
            }
            Wake::Reload => {
                if let Err(why) = station.reload("SIGHUP").await? {
                    error!("SIGHUP: {why}");
                }
                stats_timer = stats_timer_if_changed(stats_timer, &station.config);
            }
            Wake::Inbound(Inbound::Command(request)) => {
                if let Some(reply) = station.carry_out(&request).await? {
                    station.publisher.reply(reply);
                }
                stats_timer = stats_timer_if_changed(stats_timer, &station.config);
            }
            Wake::Inbound(Inbound::ToolResult(result)) => match &station.analyzer {
                None => station.publisher.reply(result.reply(false, "this station has no `[model]` that made calls")),
                Some(analyzer) => {
                    let busy = result.reply(false, "the model is busy; send the result again");
                    if !analyzer.inbox().tool_result(result) {
                        station.publisher.reply(busy);
                    }
                }
            },
            Wake::Analysis(AnalysisOutput::Publish(publication)) => station.publisher.publish(publication),
            Wake::Analysis(AnalysisOutput::Reply(reply)) => station.publisher.reply(reply),
            Wake::Stats => station.publisher.stats(station.stats_json()),
            Wake::Supervise => {
                if station.supervise() {
                    // Ready: from now on the check runs at the watchdog's pace.
                    let every = station.manager.watchdog_interval().unwrap_or(STATUS_EVERY);
                    supervise_timer = Some(tokio::time::interval_at(tokio::time::Instant::now() + every, every));
                }
            }
        }
    }
    if let Some(mut pipeline) = station.pipeline.take() {
        stop_pipeline(&mut pipeline).await;
    }
    // A look in progress finishes, and what it made is published before the publisher stops.
    if let Some(analyzer) = station.analyzer.take() {
        tokio::task::spawn_blocking(move || analyzer.stop()).await?;
    }
    drop(station.analysis_tx);
    while let Some(output) = analysis_rx.recv().await {
        match output {
            AnalysisOutput::Publish(publication) => station.publisher.publish(publication),
            AnalysisOutput::Reply(reply) => station.publisher.reply(reply),
        }
    }
    let report = station.publisher.stop().await?;
    log_report(&report);
    Ok(report)
}

impl Station {
    /// Reads the config file again and applies it. `Ok(Err(why))`: the config in force stays;
    /// `Err`: not even the previous config could be restored.
    async fn reload(&mut self, why: &str) -> Result<Result<String, String>, ServiceError> {
        let Some(path) = self.options.config_path.clone() else {
            return Ok(Err("this config was not read from a file, nothing to reload".into()));
        };
        let new = match config::load(&path) {
            Ok(new) => new,
            Err(e) => return Ok(Err(format!("the config file is not valid; the one in force stays:\n{e}"))),
        };
        if new == self.config {
            info!("{why}: {} is unchanged", path.display());
            return Ok(Ok(format!("{} is unchanged", path.display())));
        }
        info!("{why}: applying the new config from {}", path.display());
        self.manager.reloading();
        let applied = self.apply(new, &path).await;
        let status = self.status_line();
        self.manager.ready(&status);
        applied
    }

    /// Replaces the config in force by `new`, restarting only the stages whose part changed.
    async fn apply(&mut self, new: Config, path: &std::path::Path) -> Result<Result<String, String>, ServiceError> {
        let was_capturing = self.pipeline.is_some();
        self.stop_capture().await;
        let mut config = new;
        let mut failure = None;
        if needs_new_analyzer(&self.config, &config) {
            // One model in memory at a time: a Pi has no room for two.
            if let Some(analyzer) = self.analyzer.take() {
                tokio::task::spawn_blocking(move || analyzer.stop()).await?;
            }
            self.analyzer = match self.load_analyzer(&config).await? {
                Ok(analyzer) => analyzer,
                Err(e) => {
                    failure = Some(format!("cannot start the new config's model stage ({e})"));
                    config = self.config.clone();
                    self.load_analyzer(&config).await??
                }
            };
        }
        if failure.is_none() && needs_new_publisher(&self.config, &config) {
            // The old publisher lets go of its outbox before the new one opens it.
            log_report(&self.publisher.stop().await?);
            self.publisher = match publish::spawn(&config, self.options.echo) {
                Ok(publisher) => publisher,
                Err(e) => {
                    failure = Some(format!("cannot start the new config's publisher ({e})"));
                    config = self.config.clone();
                    publish::spawn(&config, self.options.echo)?
                }
            };
            self.commands = self.publisher.take_commands();
        }
        if was_capturing && failure.is_none() {
            match Pipeline::start(&config, self.publisher.events(), &self.publisher.devices(), self.inbox()) {
                Ok(pipeline) => self.pipeline = Some(pipeline),
                Err(e) => {
                    failure = Some(format!("cannot start the new config's capture ({e})"));
                    config = self.config.clone();
                }
            }
        }
        if was_capturing && self.pipeline.is_none() {
            self.pipeline =
                Some(Pipeline::start(&config, self.publisher.events(), &self.publisher.devices(), self.inbox())?);
        }
        self.config = config;
        Ok(match failure {
            Some(why) => Err(format!("{why}; going back to the previous one")),
            None if was_capturing => Ok(format!("applied {}", path.display())),
            None => Ok(format!("applied {} (capture stays paused)", path.display())),
        })
    }

    /// Loads `config`'s model off the main loop: a minute on a Pi, longer than the watchdog allows
    /// a silent loop. Meanwhile the watchdog is fed while the publisher beats and the load has
    /// run less than `MODEL_LOAD_LIMIT`; a load that hangs past it is a wedge like any other.
    async fn load_analyzer(
        &mut self,
        config: &Config,
    ) -> Result<Result<Option<Analyzer>, AnalysisError>, ServiceError> {
        let (owned, out) = (config.clone(), self.analysis_tx.clone());
        let mut loading = tokio::task::spawn_blocking(move || Analyzer::start(&owned, out));
        let Some(limit) = self.manager.wedged_after() else { return Ok(loading.await?) };
        let started = Instant::now();
        let mut check = tokio::time::interval(self.manager.watchdog_interval().unwrap_or(STATUS_EVERY));
        loop {
            tokio::select! {
                loaded = &mut loading => return Ok(loaded?),
                _ = check.tick() => {
                    let mut wedged = supervision::wedged([("publisher", self.publisher.heartbeat())], limit);
                    if started.elapsed() > MODEL_LOAD_LIMIT {
                        wedged.push(format!("model (loading for {} s)", started.elapsed().as_secs()));
                    }
                    self.manager.status(&format!("loading the model ({} s)", started.elapsed().as_secs()));
                    self.manager.watchdog(&wedged);
                }
            }
        }
    }

    /// Carries out a command; `None` when the reply comes later (from the model stage).
    async fn carry_out(&mut self, request: &CommandRequest) -> Result<Option<CommandReply>, ServiceError> {
        let failed = |message: String| CommandReply::failed(request.command.name(), request.id.clone(), message);
        Ok(Some(match &request.command {
            Command::Pause if self.pipeline.is_none() => CommandReply::done(request, "capture was already paused"),
            Command::Pause => {
                self.stop_capture().await;
                info!("capture paused by command");
                CommandReply::done(request, "capture paused")
            }
            Command::Resume if self.pipeline.is_some() => CommandReply::done(request, "capture was not paused"),
            Command::Resume => {
                match Pipeline::start(&self.config, self.publisher.events(), &self.publisher.devices(), self.inbox()) {
                    Ok(pipeline) => {
                        self.pipeline = Some(pipeline);
                        info!("capture resumed by command");
                        CommandReply::done(request, "capture resumed")
                    }
                    Err(e) => failed(format!("cannot start capture: {e}")),
                }
            }
            Command::Reload => match self.reload("reload command").await? {
                Ok(message) => CommandReply::done(request, message),
                Err(message) => failed(message),
            },
            Command::ForgetHomeAssistant if !self.config.home_assistant.enabled => {
                failed("Home Assistant discovery is off in this station's config".into())
            }
            Command::ForgetHomeAssistant => {
                self.publisher.forget_home_assistant();
                CommandReply::done(request, "removed from Home Assistant until the next start or reload")
            }
            Command::CaptureNow | Command::Ask { .. } => match (&self.analyzer, &self.pipeline) {
                (None, _) => failed("this station has no `[model]` to look and listen with".into()),
                (Some(_), None) => failed("capture is paused: there is no current scene; resume first".into()),
                (Some(analyzer), Some(_)) if analyzer.inbox().command(request.clone()) => return Ok(None),
                (Some(_), Some(_)) => failed("the model is busy with earlier commands; try again".into()),
            },
        }))
    }

    fn inbox(&self) -> Option<std::sync::Arc<crate::analysis::Inbox>> {
        self.analyzer.as_ref().map(Analyzer::inbox)
    }

    async fn stop_capture(&mut self) {
        if let Some(mut pipeline) = self.pipeline.take() {
            stop_pipeline(&mut pipeline).await;
            self.earlier_counts = self.earlier_counts.then(pipeline.counts());
        }
    }

    /// Tells systemd how the station is and feeds its watchdog while no stage is wedged. True
    /// when this made the station ready: capture and model are up from the start, so that is when
    /// the broker has connected, or after `BROKER_READY_WAIT` without it (the outbox keeps
    /// everything meanwhile, and a station without its link still watches).
    fn supervise(&mut self) -> bool {
        let status = self.status_line();
        let becomes_ready = !self.manager.is_ready()
            && (self.publisher.figures().connected || self.started.elapsed() >= BROKER_READY_WAIT);
        if becomes_ready {
            self.manager.ready(&status);
        } else {
            self.manager.status(&status);
        }
        if let Some(limit) = self.manager.wedged_after() {
            let devices = self.publisher.devices();
            let mut stages = vec![("publisher", self.publisher.heartbeat())];
            if self.pipeline.is_some() {
                stages.push(("camera source", devices.camera.heartbeat()));
                stages.push(("microphone source", devices.microphone.heartbeat()));
            }
            stages.extend(self.pipeline.iter().flat_map(Pipeline::gate_heartbeats));
            stages.extend(self.analyzer.iter().map(|analyzer| ("model", analyzer.heartbeat())));
            let wedged = supervision::wedged(stages, limit);
            self.manager.watchdog(&wedged);
        }
        becomes_ready
    }

    /// One line for `systemctl status`: what the station is doing now.
    fn status_line(&self) -> String {
        let figures = self.publisher.figures();
        let mut parts = vec![if figures.connected {
            format!("broker {} connected", self.config.mqtt.host)
        } else {
            format!(
                "broker {} unreachable, {} messages kept in the outbox",
                self.config.mqtt.host, figures.outbox_messages
            )
        }];
        if self.pipeline.is_some() {
            let devices = self.publisher.devices();
            for (name, reporter) in [("camera", &devices.camera), ("microphone", &devices.microphone)] {
                parts.extend(reporter.state().map(|state| format!("{name} {state}")));
            }
        } else {
            parts.push("capture paused".into());
        }
        let capture = self.earlier_counts.then(self.pipeline.as_ref().map(Pipeline::counts).unwrap_or_default());
        parts.push(format!("{} events", capture.events));
        if let Some(analyzer) = &self.analyzer {
            parts.push(format!("{} looks", analyzer.figures().looks));
        }
        parts.join("; ")
    }

    fn stats_json(&self) -> String {
        let capture = match &self.pipeline {
            Some(pipeline) => self.earlier_counts.then(pipeline.counts()),
            None => self.earlier_counts.then(CaptureCounts::default()),
        };
        let stats = StationStats {
            station: &self.config.station.id,
            timestamp: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            paused: self.pipeline.is_none(),
            capture,
            publisher: self.publisher.figures(),
            model: self.analyzer.as_ref().map(Analyzer::figures),
            temperature_c: cpu_temperature(),
        };
        serde_json::to_string(&stats).unwrap_or_default()
    }
}

/// The payload of `<root>/stats`.
#[derive(Debug, Serialize)]
struct StationStats<'a> {
    station: &'a str,
    timestamp: String,
    uptime_secs: u64,
    /// Capture stopped by a `pause` command.
    paused: bool,
    capture: CaptureCounts,
    publisher: PublisherFigures,
    /// With `[model]`: looks taken and how long they took.
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<AnalysisFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature_c: Option<f64>,
}

/// The SoC's temperature, where the kernel exposes it (the Pi's `cpu-thermal` is zone 0).
fn cpu_temperature() -> Option<f64> {
    let text = std::fs::read_to_string("/sys/class/thermal/thermal_zone0/temp").ok()?;
    text.trim().parse::<f64>().ok().map(|millidegrees| millidegrees / 1000.0)
}

async fn finished(pipeline: &mut Option<Pipeline>) {
    match pipeline {
        Some(pipeline) => pipeline.finished().await,
        None => std::future::pending().await,
    }
}

async fn next_command(commands: &mut Option<mpsc::Receiver<Inbound>>) -> Option<Inbound> {
    match commands {
        Some(commands) => commands.recv().await,
        None => std::future::pending().await,
    }
}

fn stats_timer(config: &Config) -> Option<(f64, tokio::time::Interval)> {
    let secs = config.stats.interval_secs;
    (secs > 0.0).then(|| {
        let period = Duration::from_secs_f64(secs);
        (secs, tokio::time::interval_at(tokio::time::Instant::now() + period, period))
    })
}

fn stats_timer_if_changed(
    timer: Option<(f64, tokio::time::Interval)>,
    config: &Config,
) -> Option<(f64, tokio::time::Interval)> {
    match timer {
        Some((secs, _)) if secs == config.stats.interval_secs => timer,
        None if config.stats.interval_secs <= 0.0 => None,
        _ => stats_timer(config),
    }
}

/// Until the station is ready, how often readiness is checked.
const STARTUP_CHECK_EVERY: Duration = Duration::from_millis(500);
/// Without a watchdog, how often the status line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// How long a model load during a reload may take before it counts as wedged: a 3 GB bundle read
/// from an SD card and its sha256s checked take about a minute on a Pi 5.
const MODEL_LOAD_LIMIT: Duration = Duration::from_secs(300);
/// How long start-up waits for the broker before saying ready without it.
const BROKER_READY_WAIT: Duration = Duration::from_secs(30);

/// The timer's next tick; never without a timer.
async fn tick(timer: Option<&mut tokio::time::Interval>) {
    match timer {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Outputs of the model stage waiting for the service.
const ANALYSIS_QUEUE: usize = 64;

/// The model and what it is asked are fixed for an analyzer's life.
fn needs_new_analyzer(old: &Config, new: &Config) -> bool {
    old.model != new.model
        || old.analysis != new.analysis
        || old.alerts != new.alerts
        || old.tools != new.tools
        || old.station != new.station
        || old.base_dir != new.base_dir
}

/// How long a stop waits for the sources to let go of their devices.
const SOURCE_STOP_TIMEOUT: Duration = Duration::from_secs(6);

async fn stop_pipeline(pipeline: &mut Pipeline) {
    pipeline.stop();
    pipeline.finished().await;
    if !pipeline.sources_stopped(SOURCE_STOP_TIMEOUT).await {
        warn!("a capture source did not stop within {SOURCE_STOP_TIMEOUT:?}; it is left to finish on its own");
    }
    info!("capture stopped: {}", pipeline.summary());
}

fn log_report(report: &PublisherReport) {
    info!(
        "publisher stopped: {} events delivered, {} undelivered, {} messages in the outbox",
        report.events_delivered, report.events_undelivered, report.outbox_held
    );
}

/// The connection, the topics and the publisher's queue are fixed for a publisher's life.
fn needs_new_publisher(old: &Config, new: &Config) -> bool {
    old.mqtt != new.mqtt
        || old.station != new.station
        || old.commands != new.commands
        || old.home_assistant != new.home_assistant
        || old.tools != new.tools
        || old.queues.events != new.queues.events
        || old.outbox != new.outbox
        || old.outbox_dir() != new.outbox_dir()
}
