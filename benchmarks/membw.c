/* Memory read bandwidth: every thread sums its own contiguous share of a large array,
 * with several independent vector accumulators so the loads, not the adds, limit it. */
#include <stdint.h>
#include <omp.h>

/* Loads may be unaligned: numpy's large arrays start 16 bytes into a page. */
typedef float vf __attribute__((vector_size(64), aligned(4)));

float read_sum(const float *data, int64_t n, int threads)
{
    float total = 0.0f;
    #pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t chunks = n / 64;   /* 64 floats = 4 vectors per step */
        int64_t lo = chunks * t / nt, hi = chunks * (t + 1) / nt;
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t i = lo; i < hi; i++) {
            const vf *p = (const vf *)(data + i * 64);
            a0 += p[0]; a1 += p[1]; a2 += p[2]; a3 += p[3];
        }
        vf a = a0 + a1 + a2 + a3;
        for (int i = 0; i < 16; i++) total += a[i];
    }
    return total;
}
