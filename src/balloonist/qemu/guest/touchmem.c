/*
 * touchmem: the test and demo workload inside balloonist's guests.
 *
 *   touchmem SCHEDULE [GROW_MIB_PER_S]
 *
 * SCHEDULE is a comma-separated list of WS_MIB@T_S: from T_S seconds after start the
 * working set is WS_MIB (e.g. "100@0,300@30,100@60"). The program keeps writing one
 * byte to every page of its working set, sweep after sweep; a larger working set is
 * faulted in at GROW_MIB_PER_S (0: as fast as it can), a smaller one is given back to
 * the guest kernel with madvise(MADV_DONTNEED). Every second it prints one line on
 * stdout (the serial console):
 *
 *   BALLOONIST-WORK t=12 ws_mib=300 resident_mib=300 pages_per_s=81234
 *
 * pages_per_s is the throughput: pages written in that second.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096UL
#define MAX_STEPS 64

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	long ws_mib[MAX_STEPS], at_s[MAX_STEPS];
	int steps = 0;
	if (argc < 2) {
		fprintf(stderr, "usage: touchmem WS_MIB@T_S[,...] [GROW_MIB_PER_S]\n");
		return 2;
	}
	char *spec = strdup(argv[1]);
	for (char *tok = strtok(spec, ","); tok && steps < MAX_STEPS; tok = strtok(NULL, ",")) {
		if (sscanf(tok, "%ld@%ld", &ws_mib[steps], &at_s[steps]) != 2 || ws_mib[steps] < 0) {
			fprintf(stderr, "touchmem: bad step %s\n", tok);
			return 2;
		}
		steps++;
	}
	double grow = argc > 2 ? atof(argv[2]) : 0.0;
	long max_mib = 0;
	for (int i = 0; i < steps; i++)
		if (ws_mib[i] > max_mib)
			max_mib = ws_mib[i];
	size_t max_pages = (size_t)max_mib * 256;
	char *mem = mmap(NULL, max_pages * PAGE + PAGE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) {
		perror("touchmem: mmap");
		return 1;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	double start = now_s(), last_report = start;
	size_t resident = 0, pos = 0, grow_base = 0;
	double grow_since = -1;
	unsigned long written = 0;
	unsigned char value = 1;
	for (;;) {
		double t = now_s() - start;
		long want_mib = 0;
		for (int i = 0; i < steps; i++)
			if (t >= at_s[i])
				want_mib = ws_mib[i];
		size_t want = (size_t)want_mib * 256;
		if (want > resident && grow > 0) {
			/* fault a larger working set in at GROW_MIB_PER_S from when it began */
			if (grow_since < 0) {
				grow_since = t;
				grow_base = resident;
			}
			size_t allowed = grow_base + (size_t)(grow * 256 * (t - grow_since));
			if (want > allowed)
				want = allowed;
		} else if (want <= resident) {
			grow_since = -1;
		}
		if (want < resident) {
			madvise(mem + want * PAGE, (resident - want) * PAGE, MADV_DONTNEED);
			resident = want;
			if (pos >= resident)
				pos = 0;
		} else if (want > resident) {
			resident = want;
		}
		/* one batch of writes, then look at the clock again */
		for (int i = 0; i < 4096 && resident > 0; i++) {
			mem[pos * PAGE] = value;
			if (++pos >= resident) {
				pos = 0;
				value++;
			}
			written++;
		}
		if (resident == 0) {
			struct timespec nap = {0, 10 * 1000 * 1000};
			nanosleep(&nap, NULL);
		}
		double n = now_s();
		if (n - last_report >= 1.0) {
			printf("BALLOONIST-WORK t=%ld ws_mib=%ld resident_mib=%zu pages_per_s=%lu\n",
			       (long)(n - start), want_mib, resident / 256,
			       (unsigned long)(written / (n - last_report)));
			written = 0;
			last_report = n;
		}
	}
}
