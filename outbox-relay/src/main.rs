use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = service_kit::telemetry::init("outbox-relay");
    let settings = outbox_relay::Settings::parse();
    let result = outbox_relay::run(settings, service_kit::shutdown::Shutdown::on_signals()).await;
    telemetry.shutdown();
    result
}
