use clap::Parser;

#[tokio::main]
async fn main() {
    let telemetry = service_kit::telemetry::init("saga-monitor");
    let settings = saga_monitor::Settings::parse();
    let result = saga_monitor::run(settings, service_kit::shutdown::Shutdown::on_signals()).await;
    telemetry.shutdown();
    std::process::exit(match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    })
}
