//! `eserver`: the hardened drop-in server, and its tools.
//!
//! ```text
//! eserver                      serve echo, length-prefixed, on 127.0.0.1:7878
//! eserver serve [OPTIONS]      the same, configured (see --help)
//! eserver bench [OPTIONS]      load a server, verify every reply, report
//! ```

mod args;
mod bench;
mod logger;
mod serve;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    let command = cli.command.unwrap_or(args::Command::Serve(cli.serve));
    let code = match command {
        args::Command::Serve(serve) => serve::run(serve),
        args::Command::Bench(bench) => bench::run(bench),
    };
    // Lines still queued for stderr (the final stats), for a bounded time.
    log::logger().flush();
    std::process::exit(code);
}
