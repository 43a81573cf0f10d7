use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = messaging::telemetry::init("outbox-relay");
    let settings = outbox_relay::Settings::parse();
    let result = outbox_relay::run(settings, messaging::shutdown::Shutdown::on_signals()).await;
    telemetry.shutdown();
    result
}
