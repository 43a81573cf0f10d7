use clap::Parser;

#[tokio::main]
async fn main() {
    let telemetry = service_kit::telemetry::init("payment-gateway");
    let settings = payment_gateway::Settings::parse();
    let result =
        payment_gateway::run(settings, service_kit::shutdown::Shutdown::on_signals()).await;
    telemetry.shutdown();
    std::process::exit(match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    })
}
