//! `greyfed` command-line entry point: parse arguments, set up logging, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use greyfed::cli::{
    Cli, Command, ConfigCommand, DpCommand, ExperimentCommand, KeygenCommand, ModelCommand,
};
use greyfed::lab::{attack_table, experiment, security};
use greyfed::progress::{Display, LogWriter};
use greyfed::{config_file, custody, keygen, memory, node, preset, preview, report, simulate};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    greyfed::allocator::keep_freed_memory();
    pin_compute_threads();
    let argv = match config_file::apply(std::env::args_os().collect(), &Cli::command()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(preset::apply(argv));
    let default_level = if cli.quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(LogWriter)
        .init();
    let runtime = match runtime_for(&cli.command) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let peak_rss_file = cli.peak_rss_file.clone();
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(path) = peak_rss_file
        && let Err(e) = memory::write_peak_rss(&path)
    {
        eprintln!("warning: cannot write {}: {e}", path.display());
    }
    code
}

/// The async runtime a command runs on. A participant runs on one thread:
/// its session loop and its one QUIC connection wait on each other, and its
/// training has a thread of its own, so worker threads only add wake-ups
/// across threads (on 10 participants sharing 2 cores, rounds were 1-2%
/// longer with them; docs/benchmarks.md). Everything else, the coordinator
/// serving many connections first, gets a worker per core.
fn runtime_for(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    match command {
        Command::Participant(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let display = Display::choose(cli.quiet, cli.json);
    match cli.command {
        Command::Keygen(KeygenCommand::Deployment(args)) => {
            let out = keygen::deployment(&keygen::DeploymentOptions {
                out: args.out.clone(),
                participants: args.participants,
                hosts: args.hosts.clone(),
                port: args.port,
                valid_days: args.valid_days,
            })?;
            for path in &out.written {
                println!("wrote {}", path.display());
            }
            for (identity, fingerprint) in &out.participants {
                println!("{identity} {fingerprint}");
            }
            println!("image key fingerprint: {}", out.image_key_fingerprint);
            println!(
                "copy {0}/coordinator to the coordinator machine and {0}/participant-I to \
                 participant machine I; keep {0}/ca offline (see {0}/README.txt)",
                args.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen(KeygenCommand::Participant(args)) => {
            let out = keygen::participant(&keygen::ParticipantOptions {
                bundle: args.bundle.clone(),
                identity: args.name.clone(),
                valid_days: args.valid_days,
            })?;
            for path in &out.written {
                println!("wrote {}", path.display());
            }
            println!("{}", out.allow_line);
            println!(
                "add the line above to the coordinator's allow-list.txt and reload it \
                 (systemctl reload greyfed-coordinator, or kill -HUP); copy {} to the machine",
                args.bundle.join(&args.name).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen(KeygenCommand::Ca(args)) => {
            let out = keygen::ca(&keygen::CaOptions {
                out: args.out.clone(),
                participants: args.participants,
                hosts: args.hosts.clone(),
                port: args.port,
                valid_days: args.valid_days,
            })?;
            for path in &out.written {
                println!("wrote {}", path.display());
            }
            println!(
                "copy {0}/coordinator to the coordinator machine; keep {0}/ca offline. Each \
                 participant runs `greyfed keygen request`; sign each request with `greyfed \
                 keygen sign --ca-cert {0}/ca/ca.pem --ca-key {0}/ca/ca-key.pem --csr FILE \
                 --out DIR` (see {0}/README.txt)",
                args.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen(KeygenCommand::Request(args)) => {
            let out = custody::request(&custody::RequestOptions {
                identity: args.identity.clone(),
                out: args.out.clone(),
            })?;
            for path in &out.written {
                println!("wrote {}", path.display());
            }
            println!("key fingerprint: {}", out.key_fingerprint);
            println!(
                "send {} to the CA operator (the key stays here) and confirm the key \
                 fingerprint above with them when they sign it",
                out.csr.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen(KeygenCommand::Sign(args)) => {
            let out = custody::sign(&custody::SignOptions {
                ca_cert: args.ca_cert.clone(),
                ca_key: args.ca_key.clone(),
                csr: args.csr.clone(),
                out: args.out.clone(),
                valid_days: args.valid_days,
                allow_list: args.allow_list.clone(),
            })?;
            for what in &out.not_granted {
                eprintln!("note: the request asked for {what}; not granted");
            }
            for path in &out.written {
                println!("wrote {}", path.display());
            }
            println!("identity: {}", out.identity);
            println!(
                "key fingerprint: {} (must be what the participant's `keygen request` printed)",
                out.key_fingerprint
            );
            println!("{}", out.allow_line);
            println!("send {} back to {}", out.dir.display(), out.identity);
            match &args.allow_list {
                Some(path) => println!(
                    "the line above was appended to {}: it must reach the coordinator's \
                     allow-list.txt, then reload it (systemctl reload greyfed-coordinator, or \
                     kill -HUP)",
                    path.display()
                ),
                None => println!(
                    "add the line above to the coordinator's allow-list.txt and reload it \
                     (systemctl reload greyfed-coordinator, or kill -HUP)"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen(KeygenCommand::SealImageKey(args)) => {
            let out = custody::seal(&custody::SealOptions {
                to: args.to.clone(),
                out: args.out.clone(),
                key: args.key.clone(),
                ca_cert: args.ca_cert.clone(),
            })?;
            if !out.ca_checked {
                eprintln!(
                    "warning: no --ca-cert: the certificates were not checked against the \
                     deployment CA; compare their fingerprints below with the allow list"
                );
            }
            for path in &out.written {
                println!("wrote {}", path.display());
            }
            for (identity, fingerprint, path) in &out.recipients {
                println!("{identity} {fingerprint} -> {}", path.display());
            }
            println!("image key fingerprint: {}", out.image_key_fingerprint);
            println!(
                "send each sealed file to its participant (they hold no secret in clear); \
                 give the coordinator the fingerprint above as key-fingerprint{}",
                match &out.generated_key {
                    Some(p) => format!(
                        "; keep {} (0600): this participant's image key",
                        p.display()
                    ),
                    None => String::new(),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen(KeygenCommand::UnsealImageKey(args)) => {
            let out = custody::unseal(&custody::UnsealOptions {
                sealed: args.sealed.clone(),
                cert: args.cert.clone(),
                key: args.key.clone(),
                out: args.out.clone(),
            })?;
            println!("wrote {}", out.written.display());
            println!("unsealed for {}", out.identity);
            println!(
                "image key fingerprint: {} (must be what the sealer announced)",
                out.image_key_fingerprint
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Coordinator(args) => {
            let report = node::run_coordinator(&args.settings()?, display).await?;
            Ok(if report.rounds_completed == report.rounds_planned {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "only {} of {} rounds completed",
                    report.rounds_completed, report.rounds_planned
                );
                ExitCode::FAILURE
            })
        }
        Command::Participant(args) => {
            node::run_participant(&args.settings()?, display).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Encrypt(args) => {
            let splits = node::data_pipeline(&args.data.settings()?).source.load()?;
            let key = match &args.key_file {
                Some(path) => greyfed_participant::cipher::ImageKey::read_file(path)?,
                None => greyfed_participant::cipher::ImageKey::generate(),
            };
            let legend = preview::write_preview(
                &args.preview,
                &splits.test,
                &splits.train,
                &args.modes,
                &key,
                args.block_size,
                args.count,
                args.known_pairs,
                args.scale.max(1),
            )?;
            println!("{legend}");
            println!("preview written to {}", args.preview.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Transform(args)) => {
            println!("{}", greyfed::transform::transform_model(&args.settings())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::AlignedStart(args)) => {
            let source = args.data.settings()?.source.source();
            let splits = source
                .load()
                .with_context(|| format!("loading {}", source.describe()))?;
            let input = greyfed_protocol::message::InputSpec {
                rows: splits.train.rows() as u32,
                cols: splits.train.cols() as u32,
                channels: if args.plain {
                    1
                } else {
                    args.cipher.output_channels()
                },
                classes: splits.classes.clone(),
            };
            let key = args
                .key_file
                .as_ref()
                .map(greyfed_participant::cipher::ImageKey::read_file)
                .transpose()?;
            greyfed::transform::write_aligned_start(
                &greyfed::transform::StartRecipe::aligned("gridcnn"),
                &input,
                key.as_ref().map(|k| (args.cipher, k)),
                args.block_size,
                args.seed,
                &args.out,
            )?;
            println!(
                "wrote {}: the grid CNN's aligned start for {}x{} images, {} classes{}",
                args.out.display(),
                input.rows,
                input.cols,
                input.classes.len(),
                if key.is_some() {
                    format!(", encrypted with {}", args.cipher)
                } else {
                    ", plain".to_string()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Experiment(ExperimentCommand::Encryption(args)) => {
            let settings = args.settings()?;
            let report = experiment::encryption(&settings).await?;
            println!("{}", security::attacks_markdown(&report.attacks));
            println!("{}", experiment::table_markdown(&report.rows));
            println!("tables in {}", settings.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Experiment(ExperimentCommand::Attacks(args)) => {
            let settings = args.settings()?;
            let splits = node::data_pipeline(&args.data.settings()?).source.load()?;
            let report = attack_table::run_attacks(&splits, &settings)?;
            attack_table::write_attacks(&args.out, &report, &settings.modes)?;
            println!("{}", attack_table::attacks_markdown(&report));
            println!("table and picture in {}", args.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let cli = Cli::command();
            let config = config_file::ConfigFile::load(&file, &cli)?;
            for (section, entries) in &config.sections {
                match config.dry_run(&cli, section) {
                    Ok(()) => println!("[{section}]: {} keys, complete", entries.len()),
                    Err(e) if e.position.is_none() => println!(
                        "[{section}]: {} keys; {} (give them on the command line)",
                        entries.len(),
                        e.message
                    ),
                    Err(e) => return Err(e.into()),
                }
            }
            println!("{}: ok", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Experiment(ExperimentCommand::Cell { cell, args }) => {
            println!("{}", experiment::cell(&args.settings()?, &cell).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(args) => {
            let report = simulate::simulate(&args.settings()?, display).await?;
            if display != Display::Json {
                for (i, plan) in &report.crashes {
                    println!(
                        "participant {i} crashed (scheduled) at round {}, stage {}",
                        plan.round, plan.stage
                    );
                }
                println!("{}", report.table());
                println!("{}", report.memory.line());
                println!(
                    "{} of {} rounds completed in {:.1} s; metrics in {}, summary in {}",
                    report.rounds.len(),
                    report.rounds_planned,
                    report.wall.as_secs_f64(),
                    report.out.join(greyfed::report::METRICS_FILE).display(),
                    report.out.join(greyfed::report::SUMMARY_FILE).display()
                );
            }
            // The report comes last, and its path is the last line printed.
            match &report.report {
                Ok(html) if display == Display::Json => {
                    greyfed::progress::Event::Report { path: html.clone() }.print_json();
                }
                Ok(html) => println!("report: {}", html.display()),
                Err(e) => eprintln!("warning: no report: {e:#}"),
            }
            Ok(if report.all_rounds_completed() && report.report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Report(args) => {
            let files = report::write_report(
                &args.run_dir,
                &report::ReportOptions {
                    out: args.out,
                    key_file: args.key_file,
                    data: args.data,
                    data_seed: args.data_seed,
                },
            )?;
            if let Some(note) = &files.samples_note {
                eprintln!("note: no sample images: {note}");
            }
            if display == Display::Json {
                greyfed::progress::Event::Report { path: files.html }.print_json();
            } else {
                for png in &files.pngs {
                    println!("wrote {}", png.display());
                }
                println!("report: {}", files.html.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Predict(args) => {
            use greyfed::predict::{PredictInputs, PredictSettings, predict};
            let inputs = match args.data {
                Some(path) => PredictInputs::Data(path),
                None => PredictInputs::Files(args.files),
            };
            let predictions = predict(&PredictSettings {
                model: args.model,
                image_key: args.image_key,
                inputs,
            })?;
            let written = match &args.out {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
                    predictions.write_csv(std::io::BufWriter::new(file))?;
                    format!(" -> {}", path.display())
                }
                None => {
                    predictions.write_csv(std::io::stdout().lock())?;
                    String::new()
                }
            };
            eprintln!("{}{written}", predictions.summary());
            Ok(ExitCode::SUCCESS)
        }
        Command::Dp(DpCommand::Plan(args)) => {
            let plan = args.plan().resolve().context("dp plan")?;
            println!("{}", greyfed::dp::plan_table(&plan)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Evaluate(args) => {
            let evaluation = greyfed::predict::evaluate(&greyfed::predict::EvaluateSettings {
                model: args.model,
                image_key: args.image_key,
                data: args.data,
                image_size: args.image_size,
                test_fraction: args.test_fraction,
                data_seed: args.data_seed,
            })?;
            println!("{evaluation}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// candle's matmul re-reads the CPU count from /proc on every call unless
/// `RAYON_NUM_THREADS` is set, which costs up to 3x in training throughput;
/// pin both pools to the available parallelism when the user has not chosen.
fn pin_compute_threads() {
    let n = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // SAFETY: called first thing in main, before any other thread exists.
            unsafe { std::env::set_var(var, &n) };
        }
    }
}
