/*
 * The keel-vmm demonstration guest: a bare-metal aarch64 program that runs
 * as a protected VM at EL1, MMU off, from the first byte of its image (the
 * VMM loads it at the start of guest RAM and starts it there). Position
 * independent: only PC-relative addressing. No stack, no FP/SIMD; data
 * accesses are Device memory with the MMU off, so wide ones are aligned.
 *
 * Devices (client/vmm/src/main.rs, Console): MMIO at 0x0900_0000:
 *   +0x00 TX      write: a byte to the host's console
 *   +0x08 SECRET  write: IPA of the private page holding the secret
 *   +0x10 SHARED  write: IPA of the page shared with the host (MEM_SHARE)
 *   +0x18 STATUS  write: a status word (the MEM_SHARE result)
 *
 * x0 at entry (VCPU_INIT) picks what it does (bits 0..7; bits 8..15 are
 * the VM's vCPU count for mode 2):
 *   0  demo: hello, HYP_MEMINFO, a secret into private memory at +4 MiB,
 *      a message into a page at +6 MiB + 4 KiB that it shares with the
 *      host, the IPAs reported, then PSCI SYSTEM_OFF;
 *   1  spin: hello, then computes for ever (the VMM gets killed);
 *   2  smp: vCPU 0 starts vCPUs 1..n-1 with PSCI CPU_ON (context ID: the
 *      index); each says so, stores a word for vCPU 0 in a private page
 *      (+192 KiB) and turns itself off (CPU_OFF); vCPU 0 waits for every
 *      word, then for AFFINITY_INFO to say each is OFF, reports n to
 *      STATUS and powers off;
 *   3  smp, but every vCPU started jumps to an IPA with no memory (a FAULT
 *      exit), so vCPU 0 waits for ever: the VMM must stop it;
 *   4  timer: takes interrupts through its GIC CPU interface (the virtual
 *      one keel switches), arms its virtual timer 5 times about 4 ms
 *      ahead and waits for each expiry in WFI; its handler counts the
 *      timer's interrupts (INTID 27) and turns the timer off; reports the
 *      count to STATUS and powers off;
 *   5  ipi: vCPU 0 starts vCPU 1, which unmasks interrupts and waits in
 *      WFI; vCPU 0 then sends it SGI 3 (ICC_SGI1R_EL1, an SGI exit that
 *      the VMM routes); vCPU 1 reports the INTID it took and turns itself
 *      off; vCPU 0 reports it to STATUS and powers off.
 */
    .text
    .global _start
_start:
    and     x28, x0, #0xff                  /* mode */
    ubfx    x26, x0, #8, #8                 /* vCPUs (mode 2) */
    movz    x27, #0x0900, lsl #16           /* console */
    adr     x20, _start                     /* guest RAM base */
    adr     x0, msg_hello
    bl      puts
    cmp     x28, #4
    b.eq    timer
    cmp     x28, #5
    b.eq    ipi
    cmp     x28, #2
    b.hs    smp
    cbnz    x28, spin

    /* HYP_MEMINFO: the sharing granule is 4 KiB. */
    movz    x0, #0x0002
    movk    x0, #0xc600, lsl #16
    mov     x1, #0
    mov     x2, #0
    hvc     #0
    cmp     x0, #4096
    b.ne    fail
    adr     x0, msg_meminfo
    bl      puts

    /* The secret, into a private page (base + 4 MiB). */
    add     x21, x20, #0x400, lsl #12
    adr     x1, secret
    mov     x2, x21
    mov     x3, #4                          /* 4 words: 32 bytes */
1:  ldr     x4, [x1], #8
    str     x4, [x2], #8
    subs    x3, x3, #1
    b.ne    1b
    str     x21, [x27, #0x08]
    adr     x0, msg_secret
    bl      puts

    /* One page (base + 6 MiB + 4 KiB) shared with the host, in place. */
    add     x22, x20, #0x601, lsl #12
    movz    x0, #0x0003
    movk    x0, #0xc600, lsl #16
    mov     x1, x22
    mov     x2, #0                          /* one page */
    hvc     #0
    str     x0, [x27, #0x18]
    cbnz    x0, fail
    adr     x1, message
    mov     x2, x22
    mov     x3, #6                          /* 6 words: 48 bytes */
1:  ldr     x4, [x1], #8
    str     x4, [x2], #8
    subs    x3, x3, #1
    b.ne    1b
    str     x22, [x27, #0x10]
    adr     x0, msg_shared
    bl      puts

    adr     x0, msg_bye
    bl      puts
    b       off

spin:
    adr     x0, msg_spin
    bl      puts
    mov     x1, #0
    add     x2, x20, #0x10, lsl #12         /* a private page past the image */
1:  add     x1, x1, #1
    str     x1, [x2]
    b       1b

smp:
    add     x21, x20, #0x30, lsl #12        /* the words, one per vCPU */
    mov     x23, #1
1:  cmp     x23, x26                        /* CPU_ON each of 1..n-1 */
    b.hs    2f
    movz    x0, #0x0003
    movk    x0, #0xc400, lsl #16
    mov     x1, x23                         /* MPIDR: Aff0 = index */
    adr     x2, secondary
    adr     x9, crash
    cmp     x28, #3
    csel    x2, x9, x2, eq
    mov     x3, x23                         /* context ID */
    smc     #0
    cbnz    x0, fail
    add     x23, x23, #1
    b       1b
2:  mov     x23, #1
3:  cmp     x23, x26                        /* each word, then each OFF */
    b.hs    5f
    ldr     x1, [x21, x23, lsl #3]
    movz    x2, #0x5eed, lsl #16
    add     x2, x2, x23
    cmp     x1, x2
    b.ne    3b
4:  movz    x0, #0x0004                     /* AFFINITY_INFO: 1 is OFF */
    movk    x0, #0xc400, lsl #16
    mov     x1, x23
    mov     x2, #0
    smc     #0
    cmp     x0, #1
    b.ne    4b
    add     x23, x23, #1
    b       3b
5:  str     x26, [x27, #0x18]
    adr     x0, msg_smp
    bl      puts
    b       off

timer:
    adr     x9, vectors
    msr     vbar_el1, x9
    mov     x9, #0xff
    msr     s3_0_c4_c6_0, x9                /* ICC_PMR_EL1: all through */
    mov     x9, #1
    msr     s3_0_c12_c12_7, x9              /* ICC_IGRPEN1_EL1: group 1 on */
    isb
    mov     x24, #0                         /* timer interrupts taken */
    mov     x23, #0                         /* expiries armed */
    mrs     x25, cntfrq_el0
    lsr     x25, x25, #8                    /* about 4 ms of ticks */
    msr     daifclr, #2                     /* IRQs unmasked */
1:  msr     cntv_tval_el0, x25
    mov     x9, #1
    msr     cntv_ctl_el0, x9                /* enabled, not masked */
    isb
    add     x23, x23, #1
2:  wfi
    cmp     x24, x23
    b.lo    2b
    cmp     x23, #5
    b.lo    1b
    msr     daifset, #2
    str     x24, [x27, #0x18]
    adr     x0, msg_timer
    bl      puts
    b       off

ipi:
    add     x21, x20, #0x30, lsl #12        /* [0] ready, [8] INTID taken */
    movz    x0, #0x0003
    movk    x0, #0xc400, lsl #16            /* PSCI CPU_ON */
    mov     x1, #1
    adr     x2, ipi_secondary
    mov     x3, #1
    smc     #0
    cbnz    x0, fail
1:  ldr     x1, [x21]                       /* vCPU 1 waits for interrupts */
    cmp     x1, #1
    b.ne    1b
    movz    x9, #0x0300, lsl #16            /* INTID 3 */
    orr     x9, x9, #2                      /* target list: Aff0 1 */
    msr     s3_0_c12_c11_5, x9              /* ICC_SGI1R_EL1 */
2:  ldr     x22, [x21, #8]
    cbz     x22, 2b
3:  movz    x0, #0x0004                     /* AFFINITY_INFO: 1 is OFF */
    movk    x0, #0xc400, lsl #16
    mov     x1, #1
    mov     x2, #0
    smc     #0
    cmp     x0, #1
    b.ne    3b
    str     x22, [x27, #0x18]
    adr     x0, msg_ipi
    bl      puts
    b       off

/* Mode 5's vCPU 1. */
ipi_secondary:
    movz    x27, #0x0900, lsl #16
    adr     x20, _start
    add     x21, x20, #0x30, lsl #12
    adr     x9, vectors
    msr     vbar_el1, x9
    mov     x9, #0xff
    msr     s3_0_c4_c6_0, x9                /* ICC_PMR_EL1 */
    mov     x9, #1
    msr     s3_0_c12_c12_7, x9              /* ICC_IGRPEN1_EL1 */
    isb
    mov     x22, #0
    mov     x24, #0
    msr     daifclr, #2
    str     x9, [x21]                       /* ready (1) */
1:  wfi
    cbz     x24, 1b
    msr     daifset, #2
    str     x22, [x21, #8]
    movz    x0, #0x0002                     /* PSCI CPU_OFF: no return */
    movk    x0, #0x8400, lsl #16
    smc     #0
    b       fail

/* Mode 3's vCPUs: an instruction fetch where the guest has no memory. */
crash:
    mov     x0, #0x1000
    br      x0

/* A vCPU started by CPU_ON: x0 = its index. */
secondary:
    mov     x23, x0
    movz    x27, #0x0900, lsl #16
    adr     x20, _start
    adr     x0, msg_vcpu
    bl      puts
    add     w1, w23, #'0'
    strb    w1, [x27]
    adr     x0, msg_up
    bl      puts
    add     x21, x20, #0x30, lsl #12
    movz    x2, #0x5eed, lsl #16
    add     x2, x2, x23
    str     x2, [x21, x23, lsl #3]
    movz    x0, #0x0002                     /* PSCI CPU_OFF: no return */
    movk    x0, #0x8400, lsl #16
    smc     #0
    b       fail

fail:
    adr     x0, msg_fail
    bl      puts
off:
    /* PSCI SYSTEM_OFF: keel answers PSCI on the SMC conduit */
    movz    x0, #0x0008
    movk    x0, #0x8400, lsl #16
    smc     #0
    b       .

/* Modes 4 and 5's vector table: only the EL1h IRQ entry is used. It
 * acknowledges the interrupt, turns the timer off if it was the timer's
 * (so that its level falls), counts it in x24 and keeps its INTID in x22
 * (a spurious 1023 is neither), and ends it. */
    .balign 2048
vectors:
    .org    vectors + 0x280
    mrs     x9, s3_0_c12_c12_0              /* ICC_IAR1_EL1 */
    cmp     x9, #1020
    b.hs    2f
    cmp     x9, #27
    b.ne    1f
    msr     cntv_ctl_el0, xzr
1:  add     x24, x24, #1
    mov     x22, x9
    msr     s3_0_c12_c12_1, x9              /* ICC_EOIR1_EL1 */
2:  eret

/* puts(x0 = NUL-terminated string): one MMIO write per byte. */
puts:
    ldrb    w1, [x0], #1
    cbz     w1, 2f
    strb    w1, [x27]
    b       puts
2:  ret

    .balign 8
secret:
    .ascii  "KEEL-SECRET-7f3a9c1e-0123456789!"
    .balign 8, 0
message:
    .asciz  "hello host: this page is shared by the guest"
    .balign 8, 0
msg_hello:
    .asciz  "guest: hello from a protected guest\n"
msg_meminfo:
    .asciz  "guest: HYP_MEMINFO granule 4096\n"
msg_secret:
    .asciz  "guest: secret written to private memory\n"
msg_shared:
    .asciz  "guest: message written to a shared page\n"
msg_bye:
    .asciz  "guest: powering off\n"
msg_spin:
    .asciz  "guest: spinning\n"
msg_fail:
    .asciz  "guest: FAILED\n"
msg_smp:
    .asciz  "guest: every vCPU reported and is off\n"
msg_timer:
    .asciz  "guest: 5 timer interrupts taken\n"
msg_ipi:
    .asciz  "guest: vCPU 1 took the SGI vCPU 0 sent it\n"
msg_vcpu:
    .asciz  "guest: vCPU "
msg_up:
    .asciz  " up\n"
