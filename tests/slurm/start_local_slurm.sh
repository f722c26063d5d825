#!/usr/bin/env bash
# A one-node SLURM on this machine, from Debian's packages, for tests/test_workflow.py's SLURM test:
#   tests/slurm/start_local_slurm.sh          install (apt-get, first time) and start munged, slurmctld, slurmd
#   tests/slurm/start_local_slurm.sh stop     stop them (the daemons this script started, by their pid files)
# Run as root on a Debian/Ubuntu machine that is not part of a cluster: it writes /etc/slurm/slurm.conf.
# There is no slurmdbd, so sacct is disabled: run Snakemake with --slurm-status-command squeue (MinJobAge keeps
# finished jobs visible to squeue for 10 minutes). Finished jobs are logged in $JOBCOMP (jobcomp/filetxt).
set -euo pipefail
LOGS=/var/log/slurm
JOBCOMP=$LOGS/jobcomp.log
STATE=/var/lib/slurm
PIDS=/run/slurm

stop() {
    for pidfile in "$PIDS/slurmd.pid" "$PIDS/slurmctld.pid" /run/munge/munged.pid; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" && echo "stopped $(basename "$pidfile" .pid) ($pid)"
        fi
    done
}

if [ "${1:-start}" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "run as root (it installs packages and starts daemons)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
fi

# munge: a key, and munged run as the munge user
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
fi

# slurm.conf: this machine as the one node, with the CPUs and memory slurmd detects (less 1 GB for the system)
host=$(hostname -s)
node=$(slurmd -C | head -1 | sed -E "s/^NodeName=[^ ]+/NodeName=$host/; s/ RealMemory=([0-9]+)//")
memory=$(( $(slurmd -C | head -1 | sed -E 's/.*RealMemory=([0-9]+).*/\1/') - 1024 ))
mkdir -p /etc/slurm "$LOGS" "$STATE/slurmctld" "$STATE/slurmd" "$PIDS"
cat > /etc/slurm/slurm.conf <<EOF
# written by nnunet-protokd's tests/slurm/start_local_slurm.sh: a one-node test cluster
ClusterName=protokd-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
ReturnToService=2
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$node RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

stop_slurm_only() {  # a restart picks up the new slurm.conf
    for pidfile in "$PIDS/slurmd.pid" "$PIDS/slurmctld.pid"; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; sleep 1; fi
    done
}
stop_slurm_only
slurmctld
slurmd
for _ in $(seq 30); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then break; fi
    sleep 1
done
sinfo
echo "SLURM is up: sbatch/squeue work; job-completion log $JOBCOMP; stop with $0 stop"
