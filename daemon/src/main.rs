use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost::config::{self, Config};
use outpost::model::{Bundle, Encoders};
use outpost::service::{self, ServiceOptions};
use outpost::{broker, demo};
use tracing_subscriber::EnvFilter;

/// Exit status for a config that cannot be used (sysexits' EX_CONFIG); the systemd unit does not
/// restart on it, so a bad config gives one clear message instead of a crash loop.
const EXIT_BAD_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "outpostd",
    version,
    about = "Offline multimodal sentinel: camera and microphone in, events out over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the station described by a config file.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the whole pipeline on built-in sample media, with a broker of its own unless
    /// --broker is given, printing every message as the broker acknowledges it.
    Demo {
        /// Use this broker instead of starting one.
        #[arg(long, value_name = "HOST:PORT")]
        broker: Option<String>,
    },
    /// Check a config file: print the effective config, or every problem found.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// List the microphones and cameras this machine offers, as a config names them, with each
    /// camera's formats, sizes and rates.
    Probe {
        /// Describe this camera node instead of every one under /dev (repeatable).
        #[arg(long = "camera", value_name = "DEVICE")]
        cameras: Vec<PathBuf>,
    },
    /// Measure the model on this machine: load time, peak memory, prefill and decode rates, a
    /// scene request's first token, the encoders, and how near decoding comes to the memory
    /// bandwidth's limit.
    Bench(BenchArgs),
    /// Work with model bundles.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Check a bundle's files against its manifest and describe the model.
    Inspect {
        #[arg(value_name = "BUNDLE")]
        bundle: PathBuf,
    },
    /// Ask the model one question and stream its answer to stdout.
    Run(ModelRunArgs),
}

/// Which model, and on how many threads.
#[derive(clap::Args)]
struct ModelChoice {
    /// The model bundle; by default the one the `--config` file's `[model]` names.
    #[arg(value_name = "BUNDLE", required_unless_present = "config")]
    bundle: Option<PathBuf>,
    /// A station config whose `[model]` table gives the bundle and the thread count.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Matrix-multiplication threads; by default `[model] threads` of the --config file, else
    /// one per core.
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct ModelRunArgs {
    #[command(flatten)]
    model: ModelChoice,
    #[arg(long)]
    prompt: String,
    /// A picture for the model to look at (PNG or JPEG).
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Soft tokens the picture may use: 70, 140, 280, 560 or 1120.
    #[arg(long, default_value_t = 280)]
    image_budget: usize,
    /// A WAV file for the model to hear (16 kHz; mixed to mono).
    #[arg(long, value_name = "FILE")]
    audio: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelChoice,
    #[command(flatten)]
    settings: outpost::bench::BenchSettings,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => match config::load(&config) {
            Ok(loaded) => run(loaded, ServiceOptions { config_path: Some(config), echo: false }),
            Err(e) => return config_error(&e),
        },
        Command::Demo { broker } => run_demo(broker),
        Command::CheckConfig { file } => match config::load(&file) {
            Ok(loaded) => {
                print!("{}", loaded.to_toml_redacted());
                eprintln!("{}: config is valid", file.display());
                Ok(())
            }
            Err(e) => return config_error(&e),
        },
        Command::Probe { cameras } => {
            print!("{}", outpost::probe::report(&cameras));
            Ok(())
        }
        Command::Model { command: ModelCommand::Inspect { bundle } } => {
            Bundle::open(&bundle).map(|bundle| print!("{bundle}")).map_err(anyhow::Error::from)
        }
        Command::Model { command: ModelCommand::Run(args) } => model_run(&args),
        Command::Bench(args) => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpostd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn model_run(args: &ModelRunArgs) -> anyhow::Result<()> {
    use std::io::Write;

    use outpost::model::{use_threads, Model, Question, Sampling};

    let ChosenModel { bundle, threads, encoders } = chosen_model(&args.model)?;
    use_threads(threads);
    let audio = args.audio.as_deref().map(read_speech).transpose()?;
    let image = match &args.image {
        Some(path) => Some((
            image::open(path).with_context(|| format!("{}: not a readable picture", path.display()))?.to_rgb8(),
            args.image_budget,
        )),
        None => None,
    };
    let loading = std::time::Instant::now();
    let model = Model::load_with(&bundle, encoders)?;
    eprintln!("loaded {} in {:.2?} ({threads} threads)", model.bundle.manifest.name, loading.elapsed());
    let question = Question {
        prompt: args.prompt.clone(),
        image,
        audio,
        max_tokens: args.max_tokens,
        sampling: Sampling::from_temperature(args.temperature, args.top_k, args.top_p, args.seed),
        system: None,
        tools: None,
        constraint: None,
        history: Vec::new(),
    };
    let mut stdout = std::io::stdout();
    let answer = model.answer(&question, |text| {
        let _ = write!(stdout, "{text}");
        let _ = stdout.flush();
    })?;
    println!();
    let generated = answer.token_ids.len();
    let decode = answer.total_time.saturating_sub(answer.first_token_time);
    eprintln!(
        "{} prompt tokens, {generated} generated; first token after {:.2?} (encoders {:.2?}), {:.1} tokens/s after it",
        answer.prompt_tokens,
        answer.first_token_time,
        answer.encode_time,
        generated.saturating_sub(1) as f64 / decode.as_secs_f64().max(1e-9)
    );
    Ok(())
}

/// The model a command names, directly or through a config's `[model]`.
struct ChosenModel {
    bundle: PathBuf,
    threads: usize,
    encoders: Encoders,
}

/// The bundle, thread count and encoders' residency a command names, directly or through a
/// config's `[model]`.
fn chosen_model(choice: &ModelChoice) -> anyhow::Result<ChosenModel> {
    let model_config =
        match &choice.config {
            Some(path) => match config::load(path) {
                Ok(loaded) => Some(loaded.model.clone().map(|model| (loaded, model)).with_context(|| {
                    format!("{}: has no [model] table to name the bundle and threads", path.display())
                })?),
                Err(e) => anyhow::bail!("{e}"),
            },
            None => None,
        };
    let bundle = match (&choice.bundle, &model_config) {
        (Some(bundle), _) => bundle.clone(),
        (None, Some((loaded, model))) => loaded.resolve_path(&model.bundle),
        (None, None) => anyhow::bail!("name a BUNDLE, or a --config whose [model] table names one"),
    };
    let threads = choice.threads.unwrap_or_else(|| match &model_config {
        Some((_, model)) => model.thread_count(),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    let encoders = model_config.map(|(_, model)| model.encoders).unwrap_or_default();
    Ok(ChosenModel { bundle, threads, encoders })
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    use std::io::Write;

    let ChosenModel { bundle, threads, encoders } = chosen_model(&args.model)?;
    let mut options = args.settings.options(threads);
    options.encoders = args.settings.encoders.unwrap_or(encoders);
    let report =
        outpost::bench::run(&bundle, &options).with_context(|| format!("benchmarking {}", bundle.display()))?;
    let mut stdout = std::io::stdout().lock();
    match args.settings.json {
        true => writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?,
        false => writeln!(stdout, "{report}")?,
    }
    Ok(())
}

/// A WAV file as 16 kHz mono samples in [-1, 1].
fn read_speech(path: &std::path::Path) -> anyhow::Result<Vec<f32>> {
    let recording = outpost::capture::read_wav(&outpost::media::MediaRef::Path(path.into()))?;
    anyhow::ensure!(
        recording.sample_rate == 16_000,
        "{}: the model hears 16 kHz audio, this file is {} Hz (convert it: sox IN -r 16000 -c 1 OUT.wav)",
        path.display(),
        recording.sample_rate
    );
    Ok(recording.samples)
}

fn config_error(error: &config::ConfigError) -> ExitCode {
    eprintln!("{error}");
    eprintln!("outpostd: the config has {} problem(s); nothing was started", error.problems.len());
    ExitCode::from(EXIT_BAD_CONFIG)
}

fn run_demo(broker: Option<String>) -> anyhow::Result<()> {
    let (host, port) = match &broker {
        Some(address) => {
            let (host, port) =
                address.rsplit_once(':').with_context(|| format!("--broker wants HOST:PORT, got `{address}`"))?;
            let port = port.parse::<u16>().with_context(|| format!("--broker: `{port}` is not a port number"))?;
            (host.to_owned(), port)
        }
        None => {
            let address = broker::start_embedded()?;
            eprintln!(
                "embedded MQTT broker on {address}; watch it with: mosquitto_sub -h {} -p {} -t 'outpost/#' -v",
                address.ip(),
                address.port()
            );
            (address.ip().to_string(), address.port())
        }
    };
    let config = demo::config(&host, port).context("the built-in demo config is invalid")?;
    run(config, ServiceOptions { config_path: None, echo: true })
}

/// Starts logging and the async runtime, then runs the service until it stops.
fn run(config: Config, options: ServiceOptions) -> anyhow::Result<()> {
    init_logging(&config.log.level, &config.station.id);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(service::run(config, options))?;
    Ok(())
}

fn init_logging(level: &str, station: &str) {
    use tracing_subscriber::prelude::*;

    // The embedded broker logs every connection, and an error for each clean disconnect: noise here.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},rumqttd=off")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if started_by_systemd_with_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                // Each entry: PRIORITY from the level, TARGET the stage's module, the stage's
                // span fields (OUTPOST_STAGE, OUTPOST_EVENT_ID) and the station.
                let journal = journal
                    .with_syslog_identifier("outpostd".into())
                    .with_field_prefix(Some("OUTPOST".into()))
                    .with_custom_fields([("OUTPOST_STATION", station)]);
                registry.with(journal).init();
                return;
            }
            Err(e) => eprintln!("outpostd: cannot reach the journal ({e}); logging to stderr"),
        }
    }
    registry
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()))
        .init();
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM` names its device and
/// inode): then the journal's own protocol carries priorities and fields. Anywhere else, stderr.
fn started_by_systemd_with_journal() -> bool {
    use std::os::unix::fs::MetadataExt;

    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((device, inode)) = stream.to_str().and_then(|s| s.split_once(':')) else { return false };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else { return false };
    device.parse() == Ok(stderr.dev()) && inode.parse() == Ok(stderr.ino())
}
