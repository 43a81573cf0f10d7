use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = messaging::telemetry::init("inventory-service");
    let settings = inventory_service::Settings::parse();
    let result =
        inventory_service::run(settings, messaging::shutdown::Shutdown::on_signals()).await;
    telemetry.shutdown();
    result
}
