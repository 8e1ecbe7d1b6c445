//! `ntm`: the NTMobile command-line tool.

use std::process::ExitCode;

const USAGE: &str = "usage: ntm <command>

commands:
  demo      run a whole NTMobile network on loopback (arrives with the daemons)
  version   print the version

The protocol foundation (spec/, ntm-wire, vectors/, fuzz/) is in place; the daemons, the node
runtime and `ntm demo` arrive with the runtime milestone.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("version") | Some("--version") => {
            println!("ntm {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("demo") => {
            eprintln!(
                "ntm demo: not available yet: the daemons and the node runtime it drives arrive \
                 with the runtime milestone. Run the tests with the README's test command."
            );
            ExitCode::from(2)
        }
        Some("help") | Some("--help") | Some("-h") | None => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("ntm: unknown command '{other}'\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
