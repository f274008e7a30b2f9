//! The daemon's life: start the stages, react to signals, reload the config, stop cleanly.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::config::{self, Config};
use crate::pipeline::{Pipeline, PipelineError};
use crate::publish::{self, PublisherReport};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot listen for signals: {0}")]
    Signals(std::io::Error),
    #[error("cannot start capture: {0}")]
    Capture(#[from] PipelineError),
    #[error("the publisher task failed: {0}")]
    Publisher(#[from] tokio::task::JoinError),
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
}

/// Runs until SIGTERM or SIGINT, or until every source has ended; then flushes what is queued,
/// publishes `stopped` and returns.
pub async fn run(mut config: Config, options: ServiceOptions) -> Result<PublisherReport, ServiceError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServiceError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServiceError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(ServiceError::Signals)?;

    info!("station `{}` publishing under {}/", config.station.id, config.topic_root());
    let mut publisher = publish::spawn(&config, options.echo);
    let mut pipeline = match Pipeline::start(&config, publisher.events(), &publisher.devices()) {
        Ok(pipeline) => pipeline,
        Err(e) => {
            publisher.stop().await?;
            return Err(e.into());
        }
    };

    loop {
        let wake = tokio::select! {
            _ = sigterm.recv() => Wake::Stop("SIGTERM"),
            _ = sigint.recv() => Wake::Stop("SIGINT"),
            _ = sighup.recv() => Wake::Reload,
            () = pipeline.finished() => Wake::SourcesEnded,
        };
        match wake {
            Wake::Stop(signal) => {
                info!("{signal}: stopping");
                break;
            }
            Wake::SourcesEnded => {
                info!("every source has ended: stopping");
                break;
            }
            Wake::Reload => {
                let Some(path) = &options.config_path else {
                    warn!("SIGHUP: this config was not read from a file, nothing to reload");
                    continue;
                };
                let new = match config::load(path) {
                    Ok(new) => new,
                    Err(e) => {
                        error!("SIGHUP: the config file is not valid; the one in force stays:\n{e}");
                        continue;
                    }
                };
                if new == config {
                    info!("SIGHUP: {} is unchanged", path.display());
                    continue;
                }
                info!("SIGHUP: applying the new config from {}", path.display());
                stop_pipeline(&mut pipeline).await;
                if needs_new_publisher(&config, &new) {
                    log_report(&publisher.stop().await?);
                    publisher = publish::spawn(&new, options.echo);
                }
                pipeline = match Pipeline::start(&new, publisher.events(), &publisher.devices()) {
                    Ok(pipeline) => pipeline,
                    Err(e) => {
                        error!("SIGHUP: cannot start the new config ({e}); going back to the previous one");
                        Pipeline::start(&config, publisher.events(), &publisher.devices())?
                    }
                };
                config = new;
            }
        }
    }
    stop_pipeline(&mut pipeline).await;
    let report = publisher.stop().await?;
    log_report(&report);
    Ok(report)
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
    info!("publisher stopped: {} events delivered, {} undelivered", report.events_delivered, report.events_undelivered);
}

/// The connection, the topics and the publisher's queue are fixed for a publisher's life.
fn needs_new_publisher(old: &Config, new: &Config) -> bool {
    old.mqtt != new.mqtt || old.station != new.station || old.queues.events != new.queues.events
}
