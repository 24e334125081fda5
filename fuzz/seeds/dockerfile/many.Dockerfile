FROM busybox AS base
ARG X=1
ENV A=$X B="two words"
RUN echo $A \
 && echo done
COPY --from=base /a /b
WORKDIR /w
USER 1000:1000
LABEL k=v
EXPOSE 8080/tcp
VOLUME ["/data"]
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo hi"]
