# MOAT in a container: Debian 12, set up by scripts/bootstrap.sh and nothing else, so the
# image is the machine README.md and the Vagrantfile describe. Mininet needs network
# namespaces, bridges and cgroups, so the container must run privileged:
#
#   docker build -t moat .
#   docker run --rm --privileged moat                 # .ci/run: make test, as CI does
#   docker run --rm --privileged -v "$PWD/results:/moat/results" moat make demo
#
# Inside, you are root and there is no sudo: type `make demo`, `make test`, `.venv/bin/moat ...`.
FROM debian:12

WORKDIR /moat
COPY . /moat

# Everything the image has beyond Debian's base comes from the script every MOAT machine
# runs (apt packages, the moat-object user, .venv); the apt lists are then dropped to keep
# the image small (apt-get update runs again if a later bootstrap needs a package).
RUN bash scripts/bootstrap.sh && rm -rf /var/lib/apt/lists/*

ENV CI=true PYTHONUNBUFFERED=1
CMD [".ci/run"]
