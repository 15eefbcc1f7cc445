//! `gradsift`: the command-line face of the crate. Only dispatches; the commands live in
//! the `gradsift_cli` library beside it (cli/src/lib.rs).

use clap::{CommandFactory, FromArgMatches, Subcommand};
use gradsift_cli as cli;

/// Gradient compression for distributed training: top-r, random-k, rTop-k with error
/// feedback, scaled sign, and their rate-distortion analysis.
#[derive(clap::Parser)]
#[command(name = "gradsift", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train an MLP on the embedded MNIST digits with K simulated workers, compressed
    /// aggregation (rTop-k at 99% by default) next to the uncompressed baseline (the default).
    Train(cli::train::TrainArgs),
    /// Compress a synthetic ResNet-18-shaped gradient of 5 workers with every method and
    /// print bits, distortion and time.
    Demo(cli::demo::DemoArgs),
    /// Rate-distortion analysis of every compressor on your workers' gradients (.npy/.npz):
    /// bits per element, distortion, rho, R_sum(D), R_in(D) and efficiency per method.
    Analyze(cli::analyze::AnalyzeArgs),
    /// Run the seed papers' experiments (rTop-k vs top-k vs random-k; the rate-distortion
    /// paper's Fig. 6, 7 and 8) and write a markdown report with PNG plots.
    Reproduce(cli::reproduce::ReproduceArgs),
}

fn main() {
    // The matches, besides the parsed options, say which values the command line set: the
    // defaults that follow other options need to know (`gradsift reproduce --quick`).
    let matches = Cli::command().get_matches();
    let parsed = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match parsed.command {
        None => cli::train::run(&cli::train::TrainArgs::default_run()).map_err(|e| e.to_string()),
        Some(Command::Train(args)) => cli::train::run(&args).map_err(|e| e.to_string()),
        Some(Command::Demo(args)) => cli::demo::run(&args).map_err(|e| e.to_string()),
        Some(Command::Analyze(args)) => cli::analyze::run(&args).map_err(|e| e.to_string()),
        Some(Command::Reproduce(args)) => {
            let given = matches
                .subcommand_matches("reproduce")
                .map(cli::reproduce::Given::from_matches)
                .unwrap_or_default();
            cli::reproduce::run_given(&args, given).map_err(|e| e.to_string())
        }
    };
    if let Err(e) = result {
        eprintln!("gradsift: {e}");
        std::process::exit(1);
    }
}
