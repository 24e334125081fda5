# A shell image from Debian's busybox-static, no network needed.
# scripts/default-images.sh fills rootfs/ (busybox and its applet links), then builds this.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /
CMD ["/bin/sh"]
