/* How long a cache line takes to go from one CPU to another and back.
 *
 * Two threads, pinned to the CPUs given, pass one counter back and forth: the first writes an
 * odd value and waits for the next even one, the second waits for the odd value and writes
 * the even one. Each round trip moves the line to the other CPU's cache and back, so its
 * time is what any kernel pays to read what the other CPU wrote. Prints nanoseconds per
 * round trip.
 *
 *     cc -O2 -pthread -o round_trip round_trip.c && ./round_trip 0 1 200000
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Alignas(64) atomic_long counter;
static _Alignas(64) atomic_int ready;  /* the answering thread: 1 pinned, -1 could not pin */
static long trips;

static int pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *answer(void *cpu) {
    if (pin(*(int *)cpu) != 0) {
        atomic_store(&ready, -1);
        return NULL;
    }
    atomic_store(&ready, 1);
    for (long i = 0; i < trips; i++) {
        while (atomic_load_explicit(&counter, memory_order_acquire) != 2 * i + 1) {
        }
        atomic_store_explicit(&counter, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s CPU CPU ROUND_TRIPS\n", argv[0]);
        return 2;
    }
    int first = atoi(argv[1]), second = atoi(argv[2]);
    trips = atol(argv[3]);
    if (trips < 1 || pin(first) != 0) {
        fprintf(stderr, "round_trip: cannot run on CPU %d, or ROUND_TRIPS < 1\n", first);
        return 2;
    }
    pthread_t other;
    if (pthread_create(&other, NULL, answer, &second) != 0) {
        return 2;
    }
    while (atomic_load(&ready) == 0) {
    }
    if (atomic_load(&ready) < 0) {
        pthread_join(other, NULL);
        fprintf(stderr, "round_trip: cannot run on CPU %d\n", second);
        return 2;
    }
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < trips; i++) {
        atomic_store_explicit(&counter, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&counter, memory_order_acquire) != 2 * i + 2) {
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    pthread_join(other, NULL);
    double ns = (end.tv_sec - start.tv_sec) * 1e9 + (end.tv_nsec - start.tv_nsec);
    printf("%.1f\n", ns / trips);
    return 0;
}
