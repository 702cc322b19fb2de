# The shadow-alter binary (engine and proxy) in a small Debian image.
#   docker build -t shadow-alter .
#   docker run --rm shadow-alter --help
FROM rust:1-bookworm AS build
# pg_query builds libpg_query with bindgen, which needs libclang
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev clang \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY proto-tests ./proto-tests
RUN cargo build --release --locked --bin shadow-alter

FROM debian:bookworm-slim
# psql for the admin console and for trying things out; no server in this image
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home shadow-alter
COPY --from=build /src/target/release/shadow-alter /usr/local/bin/shadow-alter
USER shadow-alter
EXPOSE 6432
ENTRYPOINT ["shadow-alter"]
CMD ["--help"]
