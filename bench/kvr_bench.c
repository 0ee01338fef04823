#include "kvr_bench.h"

#include <stdio.h>
#include <string.h>

typedef int (*bench_fn)(int, char **);

static const struct {
    const char *name;
    bench_fn fn;
    const char *what;
} subcommands[] = {
    {"indexer", kvr_bench_indexer, "in-process prefix index: apply events and find_matches"},
    {"run", kvr_bench_run, "replay a trace through frontends (optionally kill a router)"},
    {"compare", kvr_bench_compare, "kv3 / kv1 / round-robin / haproxy side by side"},
    {"raft", kvr_bench_raft, "route-and-reserve through a Raft group of router processes"},
    {"route", kvr_bench_route, "route requests over NATS against one router"},
    {"ingest", kvr_bench_ingest, "KV-event ingestion through JetStream into a router"},
    {"proxy", kvr_bench_proxy, "frontend proxy overhead vs direct vs HAProxy"},
    {"worker", kvr_bench_worker, "simulated worker: concurrent streams vs its clock"},
    {"bridge", kvr_bench_bridge, "kvr-bridge: engine ZMQ events -> JetStream, blocks/s and latency"},
    {"tokenize", kvr_bench_tokenize, "HF tokenizers + chat templates vs the Rust library"},
    {"epp", kvr_bench_epp, "kvr-epp driven as Envoy's ext_proc filter: pick latency, CPU, RSS"},
    {"ceiling", kvr_bench_ceiling, "pooled-cache and infinite-cache hit rates of a trace slice"},
};

static void usage(FILE *out)
{
    fprintf(out, "usage: kvr-bench SUBCOMMAND [options]   (SUBCOMMAND --help for its options)\n\n");
    for (size_t i = 0; i < sizeof subcommands / sizeof subcommands[0]; i++)
        fprintf(out, "  %-8s %s%s\n", subcommands[i].name, subcommands[i].what,
                subcommands[i].fn ? "" : " [not built yet]");
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof subcommands / sizeof subcommands[0]; i++) {
        if (strcmp(argv[1], subcommands[i].name) != 0)
            continue;
        if (subcommands[i].fn == NULL) {
            fprintf(stderr, "kvr-bench: '%s' is not built yet\n", argv[1]);
            return 2;
        }
        return subcommands[i].fn(argc - 1, argv + 1);
    }
    fprintf(stderr, "kvr-bench: unknown subcommand '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
