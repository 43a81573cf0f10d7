#[tokio::main]
async fn main() {
    service_kit::process::main("order-service", order_service::run).await
}
