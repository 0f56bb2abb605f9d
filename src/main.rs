//! The `chainwatch` command line: argument parsing only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use chainwatch::commands;

#[derive(Parser)]
#[command(
    name = "chainwatch",
    version,
    about = "Bitcoin Core chain activity as signed, durable webhooks"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = "./watcher.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run,
    /// Validate the config, reach the node, report ZMQ topics and lag.
    Check,
    /// The whole pipeline against a built-in simulated regtest node.
    Demo {
        /// Show the daemon's log beside the narrative.
        #[arg(long)]
        verbose: bool,
    },
    /// A simulated regtest node (JSON-RPC and ZMQ as bitcoind serves them), to try `run` and
    /// `check` without bitcoind: prints the `[bitcoind]` section to use, runs until stopped.
    Simnode {
        /// Where its cookie goes (DIR/regtest/.cookie).
        #[arg(long, default_value = "./simnode")]
        dir: std::path::PathBuf,
        /// Mine a block this often (e.g. 10s); never by default.
        #[arg(long)]
        mine_every: Option<String>,
    },
    /// Print the man page (roff) on stdout.
    #[command(hide = true)]
    Manpage,
    /// Manage watches.
    #[command(subcommand)]
    Watch(WatchCmd),
    /// The event log.
    #[command(subcommand)]
    Events(EventsCmd),
    /// The delivery outbox.
    #[command(subcommand)]
    Deliveries(DeliveriesCmd),
    /// Queue an event (or every dead delivery) for delivery again.
    Redeliver {
        event_id: Option<String>,
        #[arg(long, conflicts_with = "event_id")]
        dead: bool,
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Webhook endpoints.
    #[command(subcommand)]
    Endpoints(EndpointsCmd),
    /// A local receiver that verifies and prints webhooks.
    Receive {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        #[arg(long, required = true)]
        secret: Vec<String>,
    },
    /// Check a captured webhook's signature; the body comes on stdin.
    Verify {
        #[arg(long, required = true)]
        secret: Vec<String>,
        #[arg(long)]
        id: String,
        #[arg(long)]
        timestamp: String,
        #[arg(long)]
        signature: String,
        /// Allowed clock difference in seconds.
        #[arg(long, default_value_t = 300)]
        tolerance: i64,
    },
    /// The tamper-evident event log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The store itself.
    #[command(subcommand)]
    Store(StoreCmd),
}

#[derive(Subcommand)]
enum WatchCmd {
    /// Watch an address, or a descriptor such as "wpkh(tpub…/0/*)".
    Add {
        target: String,
        #[arg(long)]
        confirmations: Option<u32>,
        /// Descriptors: fresh addresses watched beyond the highest used one (default 20).
        #[arg(long)]
        gap_limit: Option<u32>,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        metadata: Option<String>,
        /// Scan past blocks from this height for the watch (the running watcher does it).
        #[arg(long)]
        rescan_from: Option<u32>,
        /// Send this watch's events to this endpoint only (repeat for several; default: all).
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
        /// Outputs below this many satoshis pay nothing to the watch (dust).
        #[arg(long)]
        min_amount: Option<u64>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Remove {
        id: String,
    },
}

#[derive(Subcommand)]
enum EventsCmd {
    List {
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeliveriesCmd {
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        endpoint: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum EndpointsCmd {
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    Enable {
        name: String,
    },
    /// Send a webhook.test to this endpoint through the outbox (the running daemon delivers
    /// it) and print what the endpoint answered.
    Test {
        name: String,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Copy the SQLite store (watches, events with their chain, deliveries, attempts, the tip)
    /// into an empty PostgreSQL database. Stop the daemon first.
    Migrate {
        /// postgres://user:password@host:port/database
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the event log's keyed hash chain and its head.
    Verify {
        /// A head printed earlier by `audit head` ("SEQUENCE CHAIN"): the log must still hold it.
        #[arg(long)]
        anchor: Option<String>,
    },
    /// Print the newest sequence and chain value, to anchor elsewhere.
    Head {
        #[arg(long)]
        json: bool,
    },
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let cfg = || commands::load_config(&cli.config);
    match cli.command {
        Command::Run => {
            let c = cfg()?;
            commands::init_logging(c.json_logs);
            commands::run(c).await
        }
        Command::Check => commands::check(cfg()?).await,
        Command::Demo { verbose } => {
            if verbose {
                commands::init_logging(false);
            }
            chainwatch::demo::run().await
        }
        Command::Simnode { dir, mine_every } => {
            commands::simnode(&dir, mine_every.as_deref()).await
        }
        Command::Manpage => {
            let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            man.render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Watch(WatchCmd::Add {
            target,
            confirmations,
            gap_limit,
            label,
            metadata,
            rescan_from,
            endpoints,
            min_amount,
        }) => {
            let args = commands::WatchArgs {
                target,
                confirmations,
                gap_limit,
                label,
                metadata,
                rescan_from,
                endpoints,
                min_amount,
            };
            commands::watch_add(&cfg()?, args)
        }
        Command::Watch(WatchCmd::List { json }) => commands::watch_list(&cfg()?, json),
        Command::Watch(WatchCmd::Remove { id }) => commands::watch_remove(&cfg()?, &id),
        Command::Events(EventsCmd::List { after, kind, json }) => {
            commands::events_list(&cfg()?, after, kind.as_deref(), json)
        }
        Command::Deliveries(DeliveriesCmd::List {
            status,
            endpoint,
            json,
        }) => commands::deliveries_list(&cfg()?, status.as_deref(), endpoint.as_deref(), json),
        Command::Redeliver {
            event_id,
            dead,
            endpoint,
        } => {
            if event_id.is_none() && !dead {
                anyhow::bail!("redeliver needs an EVENT_ID or --dead");
            }
            commands::redeliver(&cfg()?, event_id.as_deref(), endpoint.as_deref())
        }
        Command::Endpoints(EndpointsCmd::List { json }) => commands::endpoints_list(&cfg()?, json),
        Command::Endpoints(EndpointsCmd::Enable { name }) => {
            commands::endpoints_enable(&cfg()?, &name)
        }
        Command::Endpoints(EndpointsCmd::Test { name }) => commands::endpoints_test(&cfg()?, &name),
        Command::Receive { listen, secret } => commands::receive(&listen, &secret).await,
        Command::Verify {
            secret,
            id,
            timestamp,
            signature,
            tolerance,
        } => commands::verify(&secret, &id, &timestamp, &signature, tolerance),
        Command::Audit(AuditCmd::Verify { anchor }) => {
            commands::audit_verify(&cfg()?, anchor.as_deref())
        }
        Command::Audit(AuditCmd::Head { json }) => commands::audit_head(&cfg()?, json),
        Command::Store(StoreCmd::Migrate { to }) => commands::store_migrate(&cfg()?, &to),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chainwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
