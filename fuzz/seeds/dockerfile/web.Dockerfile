# A static site served by busybox httpd: an image of the user's own, not hello, for
#   twinbox build -t web examples/web
#   sudo twinbox bench --image web --ready http://:8080/
# Needs busybox:latest in the store (scripts/default-images.sh builds it).
FROM busybox
COPY index.html /www/index.html
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
