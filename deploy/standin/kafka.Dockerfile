# Stand-in for apache/kafka where no registry can be reached: the project's patched Tansu broker
# (scripts/lib.sh builds it; scripts/compose-test.sh copies the binary into the build context).
# Memory storage: its log is lost when the container stops (apache/kafka keeps it in the
# container). See docker-compose.standin.yml.
FROM debian:bookworm-slim
COPY tansu /usr/local/bin/tansu
RUN useradd --system --uid 10002 tansu
USER tansu
ENV LISTENER_URL=tcp://0.0.0.0:9092 STORAGE_ENGINE=memory://tansu/
EXPOSE 9092
ENTRYPOINT ["/usr/local/bin/tansu"]
CMD ["broker"]
