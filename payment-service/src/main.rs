#[tokio::main]
async fn main() {
    service_kit::process::main("payment-service", payment_service::run).await
}
