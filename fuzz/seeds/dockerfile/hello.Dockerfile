# The built-in default image: one static binary, nothing else.
# scripts/default-images.sh compiles `hello` into this directory, then builds this.
FROM scratch
COPY hello /hello
LABEL org.opencontainers.image.title="twinbox hello" \
      org.opencontainers.image.description="static workload of twinbox's default image"
ENTRYPOINT ["/hello"]
CMD ["greet"]
