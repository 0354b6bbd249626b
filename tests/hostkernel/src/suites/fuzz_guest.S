/*
 * The fuzz suite's guest payload (tests/hostkernel/src/suites/fuzz.rs):
 * a loop of random guest calls driven by its own xorshift64 generator,
 * seeded from x0 (the VCPU_INIT argument), so a run is reproducible.
 *
 * Runs at guest EL1 with the MMU off from the first byte of one 4 KiB page
 * at IPA 0x80000000 (FUZZ_CODE_IPA); its data is the VM's memory at
 * 0x80200000 (FUZZ_DATA_IPA, up to 512 pages) and 0x90000000
 * (FUZZ_SHARED_IPA, pages the host shares). Position independent, no
 * stack, no FP/SIMD, aligned 8-byte accesses only.
 *
 * Each iteration does one of:
 *   MEM_SHARE / MEM_UNSHARE / MEM_RELINQUISH of a random IPA range (mostly
 *     its own pages, sometimes its code page, the shared pages, junk), then
 *     REPORTs (ipa, status | op << 16 | calls << 24 | nr << 32);
 *   a PSCI call through SMC (VERSION, FEATURES, CPU_ON, junk; rarely
 *     SYSTEM_OFF or SYSTEM_RESET);
 *   an HVC #0 with an ID from a table: host calls and the keel extensions
 *     (KEEL_CHECK_INVARIANTS, KEEL_TABLE_PAGES) must return NOT_SUPPORTED
 *     (else ERROR), unknown IDs exit to the host;
 *   an HVC with a non-zero immediate: must return NOT_SUPPORTED;
 *   a load from the window at IPA 0x40_0000_0000 (FUZZ_WINDOW) that the
 *     host never gives any guest: it must be an MMIO exit, which the host
 *     completes with ipa ^ MAGIC; any other value is an ERROR (data leaked);
 *   a load from its own data pages (data or an MMIO exit, both fine).
 * Vendor calls to the host (HYPERCALL exits):
 *   REPORT 0xC6000FE0 (x1, x2) as above;
 *   ERROR  0xC6000FE1 (what, value): an oracle failed;
 *   EXC    0xC6000FE2 (ESR_EL1, ELR_EL1): the guest took an exception
 *          (its vectors, in the second half of its page, call EXC for ever).
 * Registers: x19 generator, x20 code base, x21 data, x22 shared,
 * x23 window, x24 magic, x25 calls since the last report.
 */
    .section .rodata.keel_fuzz_guest, "a"
    .balign 4096
    .global keel_fuzz_guest_start
    .global keel_fuzz_guest_end
keel_fuzz_guest_start:
    adr     x20, keel_fuzz_guest_start
    add     x9, x20, #0x800
    msr     vbar_el1, x9
    isb
    orr     x19, x0, #1
    movz    x21, #0x8020, lsl #16
    movz    x22, #0x9000, lsl #16
    movz    x23, #0x40, lsl #32
    movz    x24, #0x5a5a
    movk    x24, #0xf022, lsl #48
    mov     x25, #0

loop:
    bl      rand
    and     x10, x9, #15
    lsr     x11, x9, #8
    cmp     x10, #8
    b.lo    memcall
    cmp     x10, #8
    b.eq    psci
    cmp     x10, #9
    b.eq    hvc_table
    cmp     x10, #10
    b.eq    hvc_imm
    cmp     x10, #13
    b.ls    read_window
    b       read_own

/* ---- MEM_SHARE (ops 0..2), MEM_UNSHARE (3..5), MEM_RELINQUISH (6, 7) ---- */
memcall:
    /* x1 = ipa from x11: sel = x11 & 7, x13 = x11 >> 3 */
    and     x12, x11, #7
    lsr     x13, x11, #3
    and     x14, x13, #511
    add     x1, x21, x14, lsl #12           /* sel 0..3: a data page */
    cmp     x12, #4
    b.lo    2f
    and     x14, x13, #3
    add     x1, x22, x14, lsl #12           /* sel 4: a shared page */
    b.eq    2f
    cmp     x12, #5
    b.ne    1f
    tst     x13, #0x700                     /* sel 5: the code page, 1 in 8 */
    csel    x1, x20, x1, eq
    b       2f
1:  cmp     x12, #6
    b.ne    3f
    mov     x1, x13                         /* sel 6: junk */
    b       2f
3:  and     x14, x13, #0xffffffff           /* sel 7: aligned, up to 2^44 */
    lsl     x1, x14, #12
2:  /* x2 = nr: 0..3, sometimes junk */
    lsr     x14, x11, #40
    and     x2, x14, #3
    tst     x14, #0x3c
    b.ne    4f
    lsr     x2, x14, #6
4:  movz    x0, #3
    cmp     x10, #3
    b.lo    5f
    movz    x0, #4
    cmp     x10, #6
    b.lo    5f
    movz    x0, #9
5:  movk    x0, #0xc600, lsl #16
    mov     x16, x0
    hvc     #0
    add     x25, x25, #1
    /* REPORT (ipa, status | op << 16 | calls << 24 | nr << 32) */
    and     x15, x0, #0xffff
    and     x14, x16, #0xff
    orr     x15, x15, x14, lsl #16
    and     x14, x25, #0xff
    orr     x15, x15, x14, lsl #24
    orr     x15, x15, x2, lsl #32
    mov     x2, x15
    movz    x0, #0x0fe0
    movk    x0, #0xc600, lsl #16
    hvc     #0
    mov     x25, #0
    b       loop

/* ---- PSCI through SMC ---- */
psci:
    and     x12, x11, #0xff
    lsr     x1, x11, #3
    lsr     x2, x11, #16
    mov     x3, x11
    movz    x0, #0x0000
    movk    x0, #0x8400, lsl #16            /* VERSION */
    cmp     x12, #64
    b.lo    6f
    movz    x0, #0x000a
    movk    x0, #0x8400, lsl #16            /* FEATURES (x1: junk) */
    and     x1, x11, #0xf
    movk    x1, #0x8400, lsl #16
    cmp     x12, #128
    b.lo    6f
    movz    x0, #0x0003
    movk    x0, #0xc400, lsl #16            /* CPU_ON */
    cmp     x12, #192
    b.lo    6f
    lsr     x0, x11, #8                     /* junk */
    cmp     x12, #254
    b.lo    6f
    movz    x0, #0x0008                     /* SYSTEM_OFF, 1 in 256 */
    movk    x0, #0x8400, lsl #16
    b.eq    6f
    movz    x0, #0x0009                     /* SYSTEM_RESET, 1 in 256 */
    movk    x0, #0x8400, lsl #16
6:  smc     #0
    add     x25, x25, #1
    b       loop

/* ---- HVC #0 with an ID from the table ---- */
hvc_table:
    and     x12, x11, #15
    adr     x14, ids
    ldr     x0, [x14, x12, lsl #3]
    cmp     x12, #15
    csel    x0, x11, x0, eq                 /* entry 15: junk */
    lsr     x1, x11, #4
    lsr     x2, x11, #12
    lsr     x3, x11, #20
    hvc     #0
    add     x25, x25, #1
    /* entries 5..12 are host calls: NOT_SUPPORTED, nothing else */
    cmp     x12, #5
    b.lo    loop
    cmp     x12, #12
    b.hi    loop
    cmn     x0, #1
    b.eq    loop
    mov     x1, #1                          /* ERROR 1: a host call from a guest */
    mov     x2, x0
    b       error

/* ---- HVC with a non-zero immediate: NOT_SUPPORTED ---- */
hvc_imm:
    movz    x0, #3
    movk    x0, #0xc600, lsl #16            /* MEM_SHARE, which must not run */
    mov     x1, x21
    mov     x2, #0
    tst     x11, #1
    b.eq    7f
    hvc     #1
    b       8f
7:  hvc     #0xffff
8:  add     x25, x25, #1
    cmn     x0, #1
    b.eq    loop
    mov     x1, #2                          /* ERROR 2: HVC #imm not refused */
    mov     x2, x0
    b       error

/* ---- a load from the window no guest is ever given: an MMIO exit ---- */
read_window:
    and     x14, x11, #0xffffffff8
    add     x1, x23, x14
    eor     x6, x1, x24
    mov     x5, #0
    ldr     x5, [x1]
    cmp     x5, x6
    b.eq    loop
    mov     x2, x5                          /* ERROR: the IPA, the value */
    b       error

/* ---- a load from its own data pages ---- */
read_own:
    and     x14, x11, #0x1ffff8
    add     x1, x21, x14
    ldr     x5, [x1]
    b       loop

/* ERROR (x1, x2), then go on */
error:
    movz    x0, #0x0fe1
    movk    x0, #0xc600, lsl #16
    hvc     #0
    b       loop

/* x9 = x19 = next xorshift64 value */
rand:
    eor     x19, x19, x19, lsl #13
    eor     x19, x19, x19, lsr #7
    eor     x19, x19, x19, lsl #17
    mov     x9, x19
    ret

    .balign 8
ids:
    .quad   0x86000000                      /* 0 FEATURES */
    .quad   0x8600ff01                      /* 1 CALL_UID */
    .quad   0x8600ff03                      /* 2 REVISION */
    .quad   0xc6000002                      /* 3 HYP_MEMINFO */
    .quad   0xc6000100                      /* 4 HYP_FEATURES */
    .quad   0xc6000101                      /* 5 HOST_SHARE_HYP */
    .quad   0xc6000103                      /* 6 HOST_DONATE_HYP */
    .quad   0xc6000104                      /* 7 HOST_RECLAIM */
    .quad   0xc6000110                      /* 8 VM_CREATE */
    .quad   0xc6000113                      /* 9 VCPU_RUN */
    .quad   0xc6000114                      /* 10 VM_DONATE */
    .quad   0xc60001f0                      /* 11 KEEL_CHECK_INVARIANTS */
    .quad   0xc60001f1                      /* 12 KEEL_TABLE_PAGES */
    .quad   0x00000000                      /* 13 unknown: exits */
    .quad   0xc6000005                      /* 14 unknown guest number: exits */
    .quad   0                               /* 15 junk (from the generator) */

/* Vectors: any exception is a failure, reported for ever. */
    .balign 2048
vectors:
    .rept 16
    .balign 128
9:  movz    x0, #0x0fe2
    movk    x0, #0xc600, lsl #16
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    hvc     #0
    b       9b
    .endr
    .balign 4096
keel_fuzz_guest_end:
