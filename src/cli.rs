//! The command line: `xlb [run] [-c PATH]`, `xlb check`, `xlb status`, `xlb version`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

/// Exit status for a config that does not validate.
pub const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser, Debug)]
#[command(name = "xlb", version, about = "XDP Layer-4 load balancer", args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, xlb runs.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the config, attach XDP and balance until told to stop.
    Run(RunArgs),
    /// Validate a config and print it with every default filled in.
    Check(ConfigArg),
    /// Print the version.
    Version,
    /// Show a running instance's status, read from its admin listener.
    Status(StatusArgs),
    /// List the backend set with weights, state and connections (admin listener).
    Backends(StatusArgs),
    /// List live connections, read from the instance's pinned conntrack map.
    Flows(FlowsArgs),
    /// Remove an instance's pinned program and connections (XDP detaches
    /// once no running xlb holds it). Stop the instance first.
    Detach(DetachArgs),
}

#[derive(Args, Debug)]
struct DetachArgs {
    /// The instance (pin directory under /sys/fs/bpf/xlb); default: from the config.
    #[arg(long, conflicts_with = "all")]
    instance: Option<String>,
    /// Every instance on this host.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Args, Debug)]
struct FlowsArgs {
    /// The instance (pin directory under /sys/fs/bpf/xlb); default: from the config.
    #[arg(long)]
    instance: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// The instance's admin listener: HOST:PORT, :PORT or http://HOST:PORT.
    #[arg(long, env = "XLB_ADMIN", default_value = crate::telemetry::client::DEFAULT_ADMIN)]
    admin: String,
    /// Print the status document as JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// User name for an instance with admin.auth; the password is read from --password-env.
    #[arg(long, env = "XLB_ADMIN_USER")]
    user: Option<String>,
    /// Environment variable holding the admin password.
    #[arg(long, default_value = crate::config::DEFAULT_PASSWORD_ENV)]
    password_env: String,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Kubeconfig for provider: kubernetes (default: $KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ConfigArg {
    /// Path to xlb.yaml.
    #[arg(short = 'c', long = "config", env = "XLB_CONFIG", default_value = "./xlb.yaml")]
    config: PathBuf,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(&cli.run),
        Some(Command::Run(a)) => run(&a),
        Some(Command::Check(a)) => check(&a),
        Some(Command::Detach(a)) => detach(&a),
        Some(Command::Status(a)) => status(&a),
        Some(Command::Backends(a)) => backends(&a),
        Some(Command::Flows(a)) => flows(&a),
        Some(Command::Version) => {
            println!("xlb {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

fn load(a: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(&a.config).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

fn check(a: &ConfigArg) -> ExitCode {
    let cfg = match load(a) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for w in cfg.warnings() {
        eprintln!("warning: {w}");
    }
    print!("{}", cfg.to_yaml());
    ExitCode::SUCCESS
}

fn run(a: &RunArgs) -> ExitCode {
    init_logging();
    let cfg = match load(&a.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    if let Err(e) = cfg.startup_checks() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sources =
        crate::provider::Sources { config_path: a.config.config.clone(), kubeconfig: a.kubeconfig.clone() };
    match rt.block_on(crate::lifecycle::run(cfg, sources)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn detach(a: &DetachArgs) -> ExitCode {
    use crate::dataplane::pins;
    let instances = if a.all {
        pins::instances()
    } else if let Some(i) = &a.instance {
        vec![i.clone()]
    } else {
        let cfg = match load(&a.config) {
            Ok(c) => c,
            Err(code) => return code,
        };
        match instance_of(&cfg) {
            Ok(i) => vec![i],
            Err(e) => {
                eprintln!("error: {e:#}; name the instance with --instance");
                return ExitCode::FAILURE;
            }
        }
    };
    let mut failed = false;
    for i in instances {
        if !crate::config::is_dns_label(&i) {
            eprintln!("error: `{i}` is not an instance name (a DNS-1123 label, as in /sys/fs/bpf/xlb/NAME)");
            failed = true;
            continue;
        }
        let dir = pins::PinDir::for_instance(&i);
        if !dir.path.exists() {
            println!("{i}: nothing pinned");
            continue;
        }
        // A running instance holds its lock: its pins are not ours to take.
        let lock = match pins::try_lock(&dir) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                let pid = pins::lock_holder(&dir).map_or_else(|| "unknown".into(), |p| p.to_string());
                eprintln!("error: {i}: running (pid {pid}); stop it first (SIGTERM drains and detaches)");
                failed = true;
                continue;
            }
            Err(e) => {
                eprintln!("error: {i}: {e:#} (are you root?)");
                failed = true;
                continue;
            }
        };
        let links = dir.linked_ifaces();
        // Removed while still locked: no instance can start on them meanwhile.
        let removed = dir.remove();
        drop(lock);
        match removed {
            Ok(()) => println!(
                "{i}: removed; XDP detached from {}",
                if links.is_empty() { "-".into() } else { links.join(", ") }
            ),
            Err(e) => {
                eprintln!("error: {i}: removing {}: {e}", dir.path.display());
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The instance a config runs as (resolving `listen: auto` on this host).
fn instance_of(cfg: &Config) -> anyhow::Result<String> {
    let listen = match cfg.listen {
        crate::config::Listen::Ip(ip) => ip,
        crate::config::Listen::Auto => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(crate::netinfo::default_route_addr())?.1
        }
    };
    Ok(crate::lifecycle::instance_name(cfg, listen))
}

fn credentials(a: &StatusArgs) -> Result<Option<crate::telemetry::client::Credentials>, ExitCode> {
    match &a.user {
        None => Ok(None),
        Some(user) => match std::env::var(&a.password_env) {
            Ok(password) => Ok(Some(crate::telemetry::client::Credentials { user: user.clone(), password })),
            Err(_) => {
                eprintln!("error: --user {user} needs the password in ${}", a.password_env);
                Err(ExitCode::FAILURE)
            }
        },
    }
}

fn print_or_fail(r: anyhow::Result<String>) -> ExitCode {
    match r {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn status(a: &StatusArgs) -> ExitCode {
    match credentials(a) {
        Ok(creds) => print_or_fail(crate::telemetry::client::status(&a.admin, a.json, creds.as_ref())),
        Err(code) => code,
    }
}

fn backends(a: &StatusArgs) -> ExitCode {
    match credentials(a) {
        Ok(creds) => print_or_fail(crate::inspect::backends(&a.admin, a.json, creds.as_ref())),
        Err(code) => code,
    }
}

fn flows(a: &FlowsArgs) -> ExitCode {
    let instance = match &a.instance {
        Some(i) => i.clone(),
        None => {
            let cfg = match load(&a.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match instance_of(&cfg) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("error: {e:#}; name the instance with --instance");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    print_or_fail(crate::inspect::flows(&instance, a.json))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
