use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    messaging::telemetry::init_logging();
    let settings = outbox_relay::Settings::parse();
    outbox_relay::run(settings, messaging::shutdown::Shutdown::on_signals()).await
}
