#[tokio::main]
async fn main() {
    service_kit::process::main("payment-gateway", payment_gateway::run).await
}
