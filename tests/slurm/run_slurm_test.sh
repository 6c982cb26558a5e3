#!/usr/bin/env bash
# The tiny study through a real SLURM on this machine, with the project's unchanged SLURM profile.
#
#   bash tests/slurm/run_slurm_test.sh        # from the project root, as root, on Debian/Ubuntu; a few minutes
#
# Installs Debian's slurmctld + slurmd + munge, and slurmdbd + MariaDB so that `sacct` has an accounting store;
# writes a one-node localhost slurm.conf (to /etc/slurm, refusing to run where one exists; removed at the end) and
# starts the daemons, their state and logs in a temporary folder; runs
#   snakemake --workflow-profile workflow/profiles/slurm
# on a tiny study (MLflow in `server` mode, training jobs asking for a GPU through the profile); then checks every
# output and that each job Snakemake submitted is in `sacct` as COMPLETED, with a GPU allocated to the GPU jobs.
# Stops everything it started, also on failure. Exit code 0 means every check passed.
#
# This machine has no GPU and 2 cores: the node declares 2 fake GPUs (empty files as their device files) and more
# CPUs and memory than it has (SlurmdParameters=config_overrides), so the profile's real requests are scheduled
# as they would be on a cluster; a fake nvidia-smi on the submit side makes the rules declare gpu=1, and the
# jobs then train on the CPU. Nothing outside this machine is contacted except the package mirrors.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$REPO/tests/slurm"
WORK=$(mktemp -d /tmp/deat-slurm.XXXXXX)
HOST=$(hostname -s)
CLUSTER=deattest
ACCOUNT=deat
# The default location: the plugin's job step clears SLURM_* variables (SLURM_CONF too) before its nested srun.
CONF_DIR=/etc/slurm
CONF_FILES=("$CONF_DIR/slurm.conf" "$CONF_DIR/slurmdbd.conf" "$CONF_DIR/gres.conf")
STARTED=()  # pid files of the daemons this script started, stopped in reverse order
WROTE_CONF=0

log() { printf '[slurm-test %(%H:%M:%S)T] %s\n' -1 "$*"; }

cleanup() {
    local status=$?
    log "stopping what this script started"
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        local pidfile=${STARTED[i]} pid
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [ $WROTE_CONF -eq 1 ]; then
        mkdir -p "$WORK/etc" && cp "${CONF_FILES[@]}" "$WORK/etc/" 2>/dev/null || true
        rm -f "${CONF_FILES[@]}"
    fi
    if [ $status -ne 0 ]; then
        log "FAILED (exit $status); logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

if [ "$(id -u)" -ne 0 ]; then
    echo "run as root: the script installs packages and starts system daemons" >&2
    exit 2
fi
for conf in "${CONF_FILES[@]}"; do
    if [ -e "$conf" ]; then
        echo "$conf exists: this machine has a SLURM setup of its own, which this test would overwrite" >&2
        exit 2
    fi
done

SECONDS=0
log "installing slurm, munge, slurmdbd, mariadb"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge mariadb-server \
    > "$WORK/apt.log"
python3 -c "import snakemake_executor_plugin_slurm" 2>/dev/null \
    || python3 -m pip install -q snakemake-executor-plugin-slurm
log "installed in ${SECONDS}s"

mkdir -p "$WORK"/{state,spool,log,run,db,bin,dev} "$CONF_DIR"
# munge: the package made /etc/munge/munge.key; munged refuses to run as root.
install -d -o munge -g munge -m 0755 /run/munge
runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/deat-test.pid
STARTED+=(/run/munge/deat-test.pid)

# MariaDB with its own data folder, socket and port, so an existing database server is never touched.
DB_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DB_SOCKET="$WORK/run/mysqld.sock"
chmod 755 "$WORK"
mariadb-install-db --user=mysql --datadir="$WORK/db" > "$WORK/log/db-init.log" 2>&1
chown -R mysql:mysql "$WORK/db" "$WORK/run"
mariadbd --user=mysql --datadir="$WORK/db" --socket="$DB_SOCKET" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --pid-file="$WORK/run/mariadb.pid" > "$WORK/log/mariadb.log" 2>&1 &
for _ in $(seq 60); do [ -S "$DB_SOCKET" ] && break; sleep 0.5; done
STARTED+=("$WORK/run/mariadb.pid")
mariadb --socket="$DB_SOCKET" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

WROTE_CONF=1
sed -e "s|@WORK@|$WORK|g" -e "s|@HOST@|$HOST|g" -e "s|@CLUSTER@|$CLUSTER|g" "$HERE/slurm.conf.in" \
    > "$CONF_DIR/slurm.conf"
sed -e "s|@WORK@|$WORK|g" -e "s|@HOST@|$HOST|g" -e "s|@DBPORT@|$DB_PORT|g" "$HERE/slurmdbd.conf.in" \
    > "$CONF_DIR/slurmdbd.conf"
# Two fake GPUs: slurmd drops a GPU without device files, and only the files' names matter without cgroups.
touch "$WORK"/dev/fakegpu{0,1}
printf 'NodeName=%s Name=gpu File=%s/dev/fakegpu[0-1]\n' "$HOST" "$WORK" > "$CONF_DIR/gres.conf"
chmod 600 "$CONF_DIR/slurmdbd.conf"

slurmdbd
STARTED+=("$WORK/run/slurmdbd.pid")
for _ in $(seq 60); do sacctmgr -n list cluster > /dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -i add cluster "$CLUSTER" > /dev/null
sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" Description="deat test" > /dev/null
sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" > /dev/null
slurmctld
STARTED+=("$WORK/run/slurmctld.pid")
slurmd
STARTED+=("$WORK/run/slurmd.pid")
for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -qx idle && break; sleep 0.5; done
sinfo -N -o "%N %T %c %m %G"
sinfo -h -o %T | grep -qx idle || { log "the node did not come up idle"; tail -n 20 "$WORK/log/slurmctld.log"; exit 1; }
log "slurm up after ${SECONDS}s"

# The study: two runs (PGD-AT, DEAT), each trained and evaluated in its own SLURM job.
STUDY="$WORK/study"
mkdir -p "$STUDY"
cp "$HERE/tiny_config.yaml" "$STUDY/config.yaml"
# uses_gpu() looks for nvidia-smi on the submit side; this one lists two cards. Jobs see it too (sbatch
# --export=ALL) and lease "card 0", then torch finds no CUDA and device auto trains on the CPU.
cp "$HERE/fake-nvidia-smi" "$WORK/bin/nvidia-smi"
chmod +x "$WORK/bin/nvidia-smi"
export PATH="$WORK/bin:$PATH" PYTHONPATH="$REPO" MLFLOW_DISABLE_TELEMETRY=true
export DEAT_SLURM_ACCOUNT="$ACCOUNT" DEAT_SLURM_PARTITION=debug
START=$(date +%Y-%m-%dT%H:%M:%S)
log "snakemake --workflow-profile workflow/profiles/slurm"
set +e
python3 -m snakemake --snakefile "$REPO/Snakefile" --directory "$STUDY" \
    --workflow-profile "$REPO/workflow/profiles/slurm" --slurm-init-seconds-before-status-checks 5 \
    > "$WORK/log/snakemake.log" 2>&1
rc=$?
set -e
tail -n 5 "$WORK/log/snakemake.log"
[ $rc -eq 0 ] || { log "snakemake failed (exit $rc)"; tail -n 60 "$WORK/log/snakemake.log"; exit 1; }
log "study done after ${SECONDS}s"

log "checking outputs and accounting"
sacct -X -n -P -S "$START" --format=JobIDRaw,Partition,Account,State,ExitCode,AllocTRES,Comment%200 \
    > "$WORK/log/sacct.txt"
cat "$WORK/log/sacct.txt"
python3 "$HERE/check_slurm_study.py" "$STUDY" "$WORK/log/snakemake.log" "$WORK/log/sacct.txt" "$ACCOUNT"
log "PASSED in ${SECONDS}s"
