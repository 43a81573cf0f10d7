//! The start and the end of every process of the system: [`main`].

use std::future::Future;

use clap::error::ErrorKind;

use crate::shutdown::Shutdown;
use crate::telemetry;

/// Runs the process `name`: telemetry first, so that everything after it is logged; then its
/// settings from flags and the environment; then `run` until it returns (SIGTERM or SIGINT stop
/// it through the [`Shutdown`] it is given). A fatal error is logged as one line naming it and
/// its causes (one JSON object under `LOG_FORMAT=json`, for a log collector), traces are
/// flushed, and the process exits with 1; settings that do not parse exit with 2, as one such
/// line under `LOG_FORMAT=json` and with clap's own message otherwise.
///
/// It exits rather than returns: returning would drop the runtime, which waits for any Kafka
/// client still closing in the background (bounded in the consumer runtime).
pub async fn main<S, F>(name: &'static str, run: impl FnOnce(S, Shutdown) -> F) -> !
where
    S: clap::Parser,
    F: Future<Output = anyhow::Result<()>>,
{
    let telemetry = telemetry::init(name);
    let settings = match S::try_parse() {
        Ok(settings) => settings,
        Err(e) if !telemetry::logs_json() || !is_failure(e.kind()) => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            let why = one_line(&text);
            tracing::error!(error = %why, "{name} cannot start: its settings are not valid: {why}");
            telemetry.shutdown();
            std::process::exit(2)
        }
    };
    let result = run(settings, Shutdown::on_signals()).await;
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "{name} stopped on a fatal error: {e:#}");
            1
        }
    };
    telemetry.shutdown();
    std::process::exit(code)
}

/// Whether clap stopped for a mistake (not for `--help` or `--version`).
fn is_failure(kind: ErrorKind) -> bool {
    !matches!(
        kind,
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    )
}

/// `text`'s lines joined with "; ", blank ones and clap's usage hints left out.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_line_message_becomes_one_line() {
        let clap = "error: invalid value 'x' for '--max-batch <MAX_BATCH>': invalid digit\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(clap),
            "error: invalid value 'x' for '--max-batch <MAX_BATCH>': invalid digit"
        );
    }
}
