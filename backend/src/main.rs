//! The `vhost-user-blk` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use vhost_user_blk::args::{Cli, Command, CAPABILITIES};
use vhost_user_blk::{control, server};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let cli = Cli::parse();
    if let Err(e) = cli.check() {
        e.exit();
    }
    if let Some(Command::Ctl(ctl)) = cli.command {
        return match control::request(&ctl.control, &ctl.request.join(" ")) {
            Ok(answer) => {
                println!("{answer}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vhost-user-blk ctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if cli.backend.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    match server::run(&cli.backend) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("vhost-user-blk: {e}");
            ExitCode::FAILURE
        }
    }
}
