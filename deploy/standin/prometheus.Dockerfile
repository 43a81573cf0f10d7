# Stand-in for prom/prometheus where no registry can be reached: Debian's prometheus package, run
# as the official image runs it (config in /etc/prometheus, data in /prometheus, port 9090, user
# nobody), with wget for the healthcheck docker-compose.yml gives it.
FROM debian:bookworm-slim
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus wget >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
