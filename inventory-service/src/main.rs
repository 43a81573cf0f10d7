use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    messaging::telemetry::init_logging();
    let settings = inventory_service::Settings::parse();
    inventory_service::run(settings, messaging::shutdown::Shutdown::on_signals()).await
}
